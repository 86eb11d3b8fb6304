"""TLS for database connections: which DSNs must verify the server, and against which CAs.

Apart from asyncpg so that the composition root can check a DSN at cold start without importing it.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

from billing.domain.errors import ConfigurationError

if TYPE_CHECKING:
    from billing.config import Settings

CERTS = Path(__file__).resolve().parents[1] / "certs"
# RDS's global bundle for an instance or cluster endpoint; Amazon's roots for an RDS Proxy endpoint (ACM)
SHIPPED_CA_FILES = (CERTS / "rds-global-bundle.pem", CERTS / "amazon-root-cas.pem")
# libpq's sslmode values that still let a connection go unverified (or in plaintext)
_WEAKER_SSLMODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca"})


@dataclass(frozen=True)
class DatabaseTls:
    """How a DSN's connection is secured: verify-full against ``ca_files`` for every TCP host.

    A DSN without ``sslmode`` (RDS's JSON secret builds one) would get asyncpg's default, ``prefer``: no
    certificate check and a silent plaintext fallback. So a TCP DSN gets an SSL context that checks the
    chain and the host name; one that asks for anything weaker is refused unless ``verify`` is off. A Unix
    socket (the embedded local server) or a DSN naming no host is left as it is: nothing crosses a network.
    """

    verify: bool = True
    ca_files: tuple[Path, ...] = SHIPPED_CA_FILES

    def check(self, dsn: str) -> None:
        """Raise ConfigurationError now (at cold start) for what ``context_for`` would refuse, without the
        cost of loading the CA files (about 120 certificates, ~17 ms) before a connection needs them."""
        if self._verifies(dsn):
            missing = [str(path) for path in self.ca_files if not path.is_file()]
            if missing:
                raise ConfigurationError(f"the database CA bundle {', '.join(missing)} is not a file")

    def context_for(self, dsn: str) -> ssl.SSLContext | None:
        """The ``ssl`` argument for asyncpg: a verifying context, or None to use the DSN as given."""
        return self._context if self._verifies(dsn) else None

    def _verifies(self, dsn: str) -> bool:
        if not self.verify:
            return False
        hosts, query = _dsn_hosts(dsn)
        if not hosts or all(host.startswith("/") for host in hosts):
            return False
        sslmode = query.get("sslmode", [None])[-1]
        if sslmode in _WEAKER_SSLMODES:
            # the mode only: the DSN holds the password
            raise ConfigurationError(
                f"the database DSN asks for sslmode={sslmode}; only verify-full is allowed over TCP "
                "(set BILLING_DB_TLS_VERIFY=false to use the DSN as given)"
            )
        # verify-full naming its own CA file: asyncpg verifies against that file
        return not (sslmode == "verify-full" and "sslrootcert" in query)

    @functools.cached_property
    def _context(self) -> ssl.SSLContext:
        # PROTOCOL_TLS_CLIENT checks the chain and the host name; only these CAs, not the system's
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        for path in self.ca_files:
            try:
                context.load_verify_locations(cafile=path)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigurationError(f"cannot load the database CA bundle {path}: {exc}") from None
        return context


def database_tls(settings: Settings) -> DatabaseTls:
    """The TLS rules the settings ask for (BILLING_DB_TLS_VERIFY, BILLING_DB_CA_BUNDLE): the functions',
    the migration's and the operator commands' connections all verify the same way."""
    files = (settings.db_ca_bundle,) if settings.db_ca_bundle else SHIPPED_CA_FILES
    return DatabaseTls(verify=settings.db_tls_verify, ca_files=files)


def _dsn_hosts(dsn: str) -> tuple[list[str], dict[str, list[str]]]:
    """The hosts a DSN names (asyncpg's rules: ``host`` in the query wins) and its query."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    if "host" in query:
        return [h for value in query["host"] for h in value.split(",") if h], query
    netloc = parts.netloc.rpartition("@")[2]
    hosts = []
    for item in netloc.split(","):
        host = item[1:].partition("]")[0] if item.startswith("[") else item.partition(":")[0]
        if host:
            hosts.append(unquote(host))
    return hosts, query

"""Which DSNs get a verifying TLS context, which are refused, and the CA bundle shipped in the layer."""

from __future__ import annotations

import ssl

import pytest
from cryptography import x509

from billing.adapters.postgres_tls import SHIPPED_CA_FILES, DatabaseTls
from billing.domain.errors import ConfigurationError

RDS_HOST = "billing.cluster-abc123.eu-west-1.rds.amazonaws.com"


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://billing:pw@/billing?host={RDS_HOST}&port=5432",  # what RDS's JSON secret builds
        f"postgresql://billing:pw@{RDS_HOST}:5432/billing",
        f"postgresql://billing:pw@{RDS_HOST}/billing?sslmode=verify-full",
        "postgresql://billing:pw@[2001:db8::1]:5432/billing",
    ],
    ids=["rds-secret", "tcp", "verify-full", "ipv6"],
)
def test_a_tcp_dsn_gets_a_context_that_checks_the_chain_and_the_host_name(dsn: str) -> None:
    # Given a TCP DSN with no sslmode, or verify-full without a CA file of its own
    # When its TLS is decided
    context = DatabaseTls().context_for(dsn)
    # Then it is a context that verifies the certificate and its host name against the shipped CAs only
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == sum(len(_certificates(f)) for f in SHIPPED_CA_FILES)


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer", "require", "verify-ca"])
def test_a_dsn_asking_for_weaker_tls_is_a_configuration_error_that_hides_the_password(mode: str) -> None:
    # Given a TCP DSN that would accept an unverified server (or plaintext)
    dsn = f"postgresql://billing:Leak-Me-2@{RDS_HOST}/billing?sslmode={mode}"
    # When its TLS is decided
    with pytest.raises(ConfigurationError) as refused:
        DatabaseTls().context_for(dsn)
    # Then it is refused, naming the mode and the opt-out, never the password
    assert f"sslmode={mode}" in str(refused.value) and "BILLING_DB_TLS_VERIFY" in str(refused.value)
    assert "Leak-Me-2" not in str(refused.value)


@pytest.mark.parametrize(
    ("dsn", "tls"),
    [
        ("postgresql://postgres:@/postgres?host=/tmp/billing-pg-x/data", DatabaseTls()),
        ("postgresql://postgres@%2Frun%2Fpostgresql/postgres", DatabaseTls()),
        (f"postgresql://billing:pw@{RDS_HOST}/billing?sslmode=disable", DatabaseTls(verify=False)),
        (f"postgresql://b:pw@{RDS_HOST}/b?sslmode=verify-full&sslrootcert=/etc/ca.pem", DatabaseTls()),
    ],
    ids=["socket-in-query", "socket-in-host", "opted-out", "own-root-cert"],
)
def test_a_socket_an_opt_out_or_a_dsn_with_its_own_ca_is_used_as_given(dsn: str, tls: DatabaseTls) -> None:
    # Given the embedded server's socket DSN, BILLING_DB_TLS_VERIFY=false, or a DSN naming its own CA
    # When its TLS is decided
    # Then asyncpg gets no context of ours
    assert tls.context_for(dsn) is None


def test_the_layer_ships_rds_and_rds_proxy_certificate_authorities() -> None:
    # Given the CA files inside the billing package (the layer copies the package whole)
    # When they are read
    subjects = [c.subject.rfc4514_string() for f in SHIPPED_CA_FILES for c in _certificates(f)]
    # Then they hold RDS's regional roots and the Amazon roots an RDS Proxy's certificate chains to
    assert any("CN=Amazon RDS eu-west-1 Root CA RSA2048 G1" in s for s in subjects)
    assert any("CN=Amazon Root CA 1" in s for s in subjects)
    assert len(subjects) == 120


@pytest.mark.parametrize("step", ["check", "context_for"], ids=["at-cold-start", "at-connect"])
def test_a_missing_ca_bundle_is_a_configuration_error(tmp_path, step: str) -> None:
    # Given BILLING_DB_CA_BUNDLE naming a file that is not there
    tls = DatabaseTls(ca_files=(tmp_path / "missing.pem",))
    # When a TCP DSN is checked at cold start, or its TLS context built
    with pytest.raises(ConfigurationError) as failed:
        getattr(tls, step)(f"postgresql://billing:pw@{RDS_HOST}/billing")
    # Then the error names the file
    assert "missing.pem" in str(failed.value)


def test_the_cold_start_check_refuses_weak_tls_too() -> None:
    # Given a DSN asking for sslmode=require
    # When the composition root checks it at cold start
    # Then it is refused there, before any connection
    with pytest.raises(ConfigurationError, match="sslmode=require"):
        DatabaseTls().check(f"postgresql://billing:pw@{RDS_HOST}/billing?sslmode=require")


def _certificates(path) -> list[x509.Certificate]:
    import warnings

    with warnings.catch_warnings():  # two old RDS roots have a negative serial number
        warnings.simplefilter("ignore")
        return x509.load_pem_x509_certificates(path.read_bytes())

"""Integration fixtures: Secrets Manager on moto's server, read through Powertools as in Lambda."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from billing_local.stack import aws_env
from testkit import Secrets

# variables that would make the adapters skip their secret
_CREDENTIAL_ENV = (
    "DATABASE_URL",
    "BILLING_ES_API_KEY",
    "BILLING_GCP_ACCESS_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "BILLING_AZURE_ACCESS_TOKEN",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_TENANT_ID",
)


@pytest.fixture
def secrets(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Secrets]:
    """Fake AWS credentials pointing at moto, no credential in the environment, Powertools' cache empty.

    The provider installed is the one ``get_secret`` builds on first use (``SecretsProvider()`` from the
    environment), with a botocore hook that logs each request it sends.
    """
    from aws_lambda_powertools.utilities import parameters
    from aws_lambda_powertools.utilities.parameters import base
    from aws_lambda_powertools.utilities.parameters.secrets import SecretsProvider

    for key, value in aws_env(moto_url).items():
        monkeypatch.setenv(key, value)
    for key in _CREDENTIAL_ENV:
        monkeypatch.delenv(key, raising=False)
    parameters.clear_caches()
    provider = SecretsProvider()
    reads: list[str] = []

    def log_request(request: Any, **_: Any) -> None:
        reads.append(json.loads(request.body)["SecretId"])

    provider.client.meta.events.register("before-send.secrets-manager.GetSecretValue", log_request)
    base.DEFAULT_PROVIDERS["secrets"] = provider
    yield Secrets(boto3.client("secretsmanager"), reads)
    parameters.clear_caches()

"""Configuration is one model, validated at cold start; secrets never show in its repr."""

from __future__ import annotations

import pytest

from billing.config import Settings, UsageSourceKind, load_settings
from billing.domain.errors import ConfigurationError


def test_defaults_need_nothing_but_a_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://billing@/billing?host=/tmp")
    settings = load_settings()
    assert settings.usage_source is UsageSourceKind.POSTGRES
    assert (settings.settle_delay_minutes, settings.lookback_hours) == (15, 24)


def test_elasticsearch_source_without_an_endpoint_fails_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BILLING_USAGE_SOURCE", "elasticsearch")
    monkeypatch.delenv("BILLING_ES_URL", raising=False)
    with pytest.raises(ConfigurationError, match="BILLING_ES_URL"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value"),
    [("BILLING_SETTLE_DELAY_MINUTES", "90"), ("BILLING_USAGE_SOURCE", "mysql"), ("BILLING_DB_POOL_MAX", "0")],
)
def test_out_of_range_values_fail_at_load(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match="invalid configuration"):
        load_settings()


def test_secrets_are_not_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://billing:hunter2-pw@db/billing")
    monkeypatch.setenv("BILLING_ES_API_KEY", "es-key-that-must-not-leak")
    text = repr(Settings()) + str(Settings().model_dump())
    assert "hunter2-pw" not in text
    assert "es-key-that-must-not-leak" not in text

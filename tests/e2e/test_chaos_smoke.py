"""bench/chaos as a command, at a small size: it runs, injects every kind of fault and prints zeros.

The figures of record (10,000 customer-hours) come from `make chaos`; this keeps the command from
rotting and is one more randomized fault run on every CI build. Like the suite, it uses the project's
HTTP doubles of the three marketplaces' metering APIs, moto's SQS server and an embedded PostgreSQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
# a fifth of the marketplace calls fail (3 % in `make chaos`), so that so small a run still meets each kind,
# the connection reset after the marketplace took the call among them
SMALL = ("--customer-hours", "180", "--hours", "2", "--outage-seconds", "8", "--seed", "3")
SMALL += ("--marketplace-fault-rate", "0.2")


def test_chaos_at_a_small_size_prints_zeros(tmp_path: Path) -> None:
    # When bench/chaos bills 90 customers for 2 hours under random faults, one marketplace down 8 s
    # an hour, and the same data clean
    proc = subprocess.run(
        [sys.executable, "-m", "bench.chaos", *SMALL],
        cwd=ROOT,
        env={**os.environ, "BENCH_RESULTS": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    # Then it exits 0, printing and writing zeros, after injecting faults of many kinds
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "double-billed         0" in proc.stdout and "lost                  0" in proc.stdout
    doc = json.loads((tmp_path / "chaos.json").read_text())
    figures = (doc["customer_hours"], doc["double_billed"], doc["lost"], doc["quantity_difference"])
    assert figures == (180, 0, 0, 0)
    assert doc["ok"] is True
    kinds = set(doc["injected"])
    assert {"poison messages", "message delivered twice at once", "database connection terminated"} <= kinds
    assert any(k.endswith("outage 503") for k in kinds)
    # a reset (RST after the marketplace took the records) and a lost answer, billed once all the same
    assert any(k.endswith(" reset") for k in kinds) and any(k.endswith(" lost") for k in kinds), kinds
    # and subscriptions cancelled while the run billed their customer's hour, nothing held after an end
    cancellations = doc["cancellations"]
    assert cancellations["during_their_bill"] >= 1 and cancellations["held_after_end"] == []
    assert cancellations["clean_run"] == cancellations["planned"]

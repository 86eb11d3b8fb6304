"""A demo that rejects records on purpose says why, and exits 0 (billing_local.cli.DEMO_REJECTS).

The demo leaves one AWS customer in fifty unsubscribed (local_run.subscribe_all: the 50th AWS customer,
then every 50th) so that a newcomer sees what a rejected record looks like. With AWS alone, 50 customers
include that one; 49 do not. Each run is the real command line on its own embedded stack.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BILLING = str(Path(sys.executable).parent / "billing")
EXPLANATION = (
    "rejected records are expected here: the demo leaves one AWS customer in fifty unsubscribed to show "
    "what a rejection looks like (`billing run` exits 1 on them unless --allow-rejected)"
)


def _demo(tmp_path: Path, customers: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "COLUMNS", "LINES"}}
    env |= {"TMPDIR": str(tmp_path), "BILLING_LOCAL_DIR": str(tmp_path / "state"), "COLUMNS": "80"}
    return subprocess.run(
        [BILLING, "demo", "--customers", str(customers), "--marketplaces", "aws"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _rejected(stdout: str) -> int:
    found = re.search(r"^\s+rejected\s+(\d+) record\(s\)", stdout, re.MULTILINE)
    assert found is not None, stdout
    return int(found[1])


@pytest.mark.parametrize("customers", [50, 49])
def test_a_demo_that_rejects_on_purpose_says_why_and_exits_0(tmp_path: Path, customers: int) -> None:
    # Given the demo on AWS alone, with the customer it leaves unsubscribed (50) or without it (49)
    proc = _demo(tmp_path, customers)
    # Then it exits 0 either way: the rejections are on purpose
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    if customers == 50:
        # and its records were rejected, and it says why on one whole line
        assert _rejected(proc.stdout) > 0
        assert EXPLANATION in lines, proc.stdout
    else:
        # and a demo that rejected nothing does not explain rejections
        assert _rejected(proc.stdout) == 0
        assert not [line for line in lines if line.startswith("rejected records are expected")], proc.stdout

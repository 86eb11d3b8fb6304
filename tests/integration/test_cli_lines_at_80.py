"""At 80 columns, `billing demo` prints each summary line whole, and no Python repr.

A fresh process with COLUMNS=80, as in a newcomer's terminal: rich wraps what a Console prints at the
terminal's width unless it is told not to, and a line broken mid-sentence cannot be grepped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BILLING = str(Path(sys.executable).parent / "billing")
_NOT_INHERITED = {"COLUMNS", "LINES", "DATABASE_URL", "BILLING_DATABASE_URL", "BILLING_DATABASE_SECRET_ARN"}


@pytest.fixture(scope="module")
def demo() -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED} | {"COLUMNS": "80"}
    return subprocess.run(
        [BILLING, "demo", "--customers", "3"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_the_demos_opening_line_is_whole_at_80_columns(demo: subprocess.CompletedProcess[str]) -> None:
    assert demo.returncode == 0, demo.stderr
    # the line is longer than 80 characters: one line from "billing" to "(the demo's clock)"
    opening = [line for line in demo.stderr.splitlines() if line.startswith("billing 3 customers")]
    assert len(opening) == 1, demo.stderr
    assert re.fullmatch(
        r"billing 3 customers \(.*\) for \S+ with \d+ consumers, as of \S+ \(the demo's clock\)", opening[0]
    )
    assert len(opening[0]) > 80


def test_the_demos_summary_lines_are_whole_and_no_python_repr(demo: subprocess.CompletedProcess[str]) -> None:
    assert demo.returncode == 0, demo.stderr
    lines = demo.stdout.splitlines()
    again = [line for line in lines if line.startswith("same hour again:")]
    assert len(again) == 1, demo.stdout
    # the held records per marketplace, as "aws 1, azure 1, gcp 1", not a dict's repr
    assert re.search(r"unchanged: True \(aws \d+, azure \d+, gcp \d+\)$", again[0]), again[0]
    assert not [line for line in lines if "{'" in line or "': " in line], demo.stdout


def test_the_demos_log_lines_go_to_the_printed_file(demo: subprocess.CompletedProcess[str]) -> None:
    # Given the demo run without --verbose: its JSON log lines are in the file it names, not the terminal
    assert demo.returncode == 0, demo.stderr
    named = [
        line.removeprefix("log lines: ")
        for line in demo.stderr.splitlines()
        if line.startswith("log lines: ")
    ]
    assert len(named) == 1, demo.stderr
    path = Path(named[0]) if Path(named[0]).is_absolute() else ROOT / named[0]
    logged = path.read_text(encoding="utf-8").splitlines()
    assert logged and all(line.startswith("{") for line in logged)
    assert '"level"' not in demo.stdout + demo.stderr


def test_the_demos_lifecycle_lines_are_whole(demo: subprocess.CompletedProcess[str]) -> None:
    # the subscription lifecycle's lines name every marketplace's tenant on one line, at 80 columns too
    assert demo.returncode == 0, demo.stderr
    lines = (demo.stdout + demo.stderr).splitlines()
    subscribed = [
        line for line in lines if line.startswith("subscribed through the marketplaces' own events:")
    ]
    assert len(subscribed) == 1, demo.stdout
    assert subscribed[0].count(",") == 2 and len(subscribed[0]) > 80, subscribed[0]

"""The README's local section, run as written: ``billing local up`` … ``billing local down``.

The fenced block after the ``<!-- readme-local -->`` anchor in README.md is run by bash with
``set -euxo pipefail`` (every command must exit 0; the trace names the one that did not) in an empty
temporary directory, against the installed ``billing`` command line and a real local stack, so the
README cannot drift from what works. Its hour is the last ended hour of the local tooling's clock, as a
reader's would be: here that clock is pinned (BILLING_LOCAL_NOW, seconds before the top of an hour), so
the test does not depend on the minute it runs at, and an hour crossing mid-block would show.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"
PINNED = "2026-11-26T14:59:50Z"


def readme_local_block() -> str:
    text = README.read_text()
    match = re.search(r"<!-- readme-local -->\s*```sh\n(.*?)```", text, re.S)
    assert match, "README.md has no fenced sh block after <!-- readme-local -->"
    return match.group(1)


def test_the_readme_local_section_runs_as_written(tmp_path: Path) -> None:
    block = readme_local_block()
    bin_dir = str(Path(sys.executable).parent)
    # nothing of the test run's own stack leaks in: the block's commands must find theirs themselves
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BILLING_", "AWS_", "DATABASE_URL", "POWERTOOLS_", "ELASTIC_APM"))
    }
    env |= {
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        "BILLING_LOCAL_DIR": str(tmp_path / "state"),
        # seconds before the top of the hour: with a clock that moved, the hour crossing would show
        "BILLING_LOCAL_NOW": PINNED,
    }
    script = tmp_path / "readme-local.sh"
    script.write_text("set -euxo pipefail\n" + block)
    try:
        proc = subprocess.run(
            ["bash", str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    finally:  # a failed step leaves the stack up: stop it (a no-op once the block's own `down` ran)
        subprocess.run(["billing", "local", "down"], cwd=tmp_path, env=env, capture_output=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    # every command of the block ran (bash -x traces each one)
    for line in block.splitlines():
        command = line.split("#")[0].strip()
        if command.startswith("billing"):
            assert f"+ {command.split()[0]} {command.split()[1]}" in proc.stderr, command
    # the block's hour is the pinned clock's last ended hour, whatever the wall clock says
    assert "+ HOUR=2026-11-26T13:00:00Z" in proc.stderr, proc.stderr[-2000:]
    seeded = int(re.search(r"billing seed --customers (\d+)", block).group(1))  # type: ignore[union-attr]
    billed = f"customers: {seeded} billable, {seeded} billed, 0 finished not billed"
    assert billed in proc.stdout, proc.stdout[:3000]
    assert ", 0 unfinished" in proc.stdout
    # status, reconcile and redrive say what a reader should see after a clean run (their exit codes,
    # 0 under set -e, say the same)
    assert "hour 2026-11-26T13:00:00Z: clean" in proc.stdout, proc.stdout[-3000:]
    assert re.search(r"^clean: (\d+) of \1 customer-dimension\(s\) fully explained$", proc.stdout, re.M)
    assert "moved 0 message(s)" in proc.stdout + proc.stderr
    assert "local stack" in proc.stdout + proc.stderr and "stopped" in proc.stdout
    assert not (tmp_path / "state" / "state.json").exists()


def test_local_up_in_the_foreground_stops_on_ctrl_c_and_deletes_its_database(tmp_path: Path) -> None:
    import json
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "DATABASE_URL"))}
    env |= {"BILLING_LOCAL_DIR": str(tmp_path / "state")}
    billing = str(Path(sys.executable).with_name("billing"))
    proc = subprocess.Popen(
        [billing, "local", "up", "--foreground"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    state_file = tmp_path / "state" / "state.json"
    try:
        deadline = time.monotonic() + 120
        while not state_file.exists():  # written once the stack answers
            assert proc.poll() is None and time.monotonic() < deadline, "the stack did not start"
            time.sleep(0.1)
        database = json.loads(state_file.read_text())["env"]["DATABASE_URL"]
        data_dir = Path(database.split("host=", 1)[1])
        assert data_dir.exists()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in out + err
    assert not state_file.exists() and not data_dir.exists()
    gone = subprocess.run(
        [billing, "local", "env"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert gone.returncode == 1
    assert gone.stderr.strip().splitlines() == [gone.stderr.strip()]
    assert "run `billing local up`" in gone.stderr

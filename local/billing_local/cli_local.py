"""``billing local up|env|down``: the embedded stack as a service other commands point at.

``billing local up`` starts PostgreSQL (embedded), moto's SQS (with billing_local.moto_fixes: linear
queues) with one queue per marketplace lane, and the three marketplace emulators in one process,
migrates the database, and writes a state file (pid, environment, log file) in the state directory
(``BILLING_LOCAL_DIR``, default ``.billing-local`` in the working directory). Detached by default: the
command returns once the stack answers, printing the ``export`` lines; ``--foreground`` keeps it in
the terminal until Ctrl-C. ``billing local down`` stops it (SIGTERM, then waits: PostgreSQL is
stopped and its data deleted by the stack's own cleanup).

The emulators know every customer in the ``customers`` table: the stack process serves an admin
endpoint (``BILLING_LOCAL_ADMIN_URL``) that reads the table and subscribes each customer, and
``billing seed`` and ``billing run`` call it when that variable is set. A synchronous call from the
command that wrote the rows, rather than a poller in the stack process, so that ``billing run`` right
after ``billing seed`` never races a poll interval.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from billing_local.errors import Failure

if TYPE_CHECKING:
    from billing_local.stack import LocalStack

local_app = typer.Typer(
    no_args_is_help=True,
    help="A local stack (PostgreSQL, SQS on moto, the marketplace emulators) for the other commands.",
    pretty_exceptions_show_locals=False,
)

STATE_FILE = "state.json"
ADMIN_VARIABLE = "BILLING_LOCAL_ADMIN_URL"


def state_dir() -> Path:
    return Path(os.environ.get("BILLING_LOCAL_DIR") or ".billing-local").absolute()


def read_state(directory: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if _alive(int(state.get("pid", 0))) else None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def export_lines(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))


def _fail(message: str) -> Failure:
    """The failure to raise: billing_local.errors prints it as one "error: " line, exit 1."""
    return Failure(message)


@local_app.command("up")
def up(
    foreground: Annotated[
        bool, typer.Option(help="Stay in the terminal until Ctrl-C instead of running in the background.")
    ] = False,
) -> None:
    """Start the local stack; print the `export` lines that point the other commands at it.

    With BILLING_LOCAL_NOW (an ISO 8601 instant) the marketplace emulators' clocks read that instant,
    and the printed environment carries it to the other commands."""
    from billing_local import clock

    clock.pinned()  # a malformed BILLING_LOCAL_NOW is a usage error before anything starts
    directory = state_dir()
    if (running := read_state(directory)) is not None:
        typer.echo(f"# the local stack is already running (pid {running['pid']}); its environment:", err=True)
        typer.echo(export_lines(running["env"]))
        return
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STATE_FILE).unlink(missing_ok=True)
    if foreground:
        serve(directory, announce=True)
        return
    log = directory / "stack.log"
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "billing_local.cli_local", str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not stopped by the terminal's Ctrl-C: `billing local down` stops it
        )
    deadline = time.monotonic() + 120
    while (state := read_state(directory)) is None:
        if proc.poll() is not None:
            raise _fail(f"the local stack did not start (exit {proc.returncode}); see {log}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise _fail(f"the local stack did not start within 120 s; see {log}")
        time.sleep(0.1)
    typer.echo(f"# local stack running (pid {state['pid']}), logs in {log}", err=True)
    typer.echo('# point the other commands at it with: eval "$(billing local env)"', err=True)
    typer.echo(export_lines(state["env"]))


@local_app.command("env")
def env() -> None:
    """Print the running local stack's environment as `export` lines, for `eval "$(billing local env)"`."""
    state = read_state(state_dir())
    if state is None:
        raise _fail(f"no local stack is running (state directory {state_dir()}): run `billing local up`")
    typer.echo(export_lines(state["env"]))


@local_app.command("down")
def down() -> None:
    """Stop the local stack started by `billing local up` (its database is deleted)."""
    directory = state_dir()
    state = read_state(directory)
    if state is None:
        typer.echo("no local stack is running", err=True)
        return
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while _alive(pid):
        if time.monotonic() > deadline:
            raise _fail(f"the local stack (pid {pid}) did not stop within 60 s")
        time.sleep(0.1)
    (directory / STATE_FILE).unlink(missing_ok=True)
    typer.echo(f"local stack (pid {pid}) stopped")


@local_app.command("hour")
def hour() -> None:
    """Print the last hour that has ended (UTC), e.g. for `billing seed --end` and `billing run --period`.

    The local tooling's clock: BILLING_LOCAL_NOW when set (as the stack's `env` carries it), else the
    wall clock."""
    from datetime import timedelta

    from billing.domain.model import Period
    from billing_local import clock

    typer.echo(Period.last_complete_before(clock.now(), timedelta(0)).isoformat())


def notify_stack() -> None:
    """Have a running local stack's emulators subscribe every customer in the database (no-op elsewhere)."""
    url = os.environ.get(ADMIN_VARIABLE)
    if not url:
        return
    import urllib.request

    request = urllib.request.Request(f"{url}/customers/refresh", method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            answer.read()
    except OSError as exc:  # URLError and HTTPError are OSErrors; the database is not the one to blame
        reason = getattr(exc, "reason", None) or exc
        raise Failure(
            f"the local stack's admin endpoint {ADMIN_VARIABLE}={url} does not answer ({reason}): start "
            'the stack with `billing local up`, then eval "$(billing local env)" (or unset '
            f"{ADMIN_VARIABLE} when not using it)"
        ) from exc


async def subscribe_every_customer(stack: LocalStack) -> int:
    """Subscribe each row of the customers table with the emulators (idempotent); how many rows."""
    import asyncpg

    from billing_local.seed import RATE_CARD

    conn = await asyncpg.connect(stack.database_url)
    try:
        rows = [dict(r) for r in await conn.fetch("SELECT * FROM customers ORDER BY id")]
    finally:
        await conn.close()
    dimensions: dict[str, set[str]] = {}
    for marketplace, _metric, dimension, _factor in RATE_CARD:
        dimensions.setdefault(marketplace, set()).add(dimension)
    stack.subscribe(rows, dimensions)
    return len(rows)


def held_records(stack: LocalStack) -> dict[str, list[list[str]]]:
    """Each record the emulators hold, as [customer, dimension, hour] by marketplace (``GET /held`` of
    the admin endpoint: what a test checks "billed exactly once" against, across processes)."""
    return {
        "aws": [[r.customer, r.dimension, r.timestamp.isoformat()] for r in stack.metering.accepted()],
        "gcp": [[r.consumer_id, r.metric, r.start_time.isoformat()] for r in stack.gcp.records.values()],
        "azure": [[e.resource_key, e.dimension, e.hour.isoformat()] for e in stack.azure.accepted.values()],
    }


def serve(directory: Path, announce: bool = False) -> None:
    """Run the stack until SIGTERM or Ctrl-C, with its state file in ``directory`` while it runs."""
    import asyncio
    import threading

    from aiohttp import web

    from billing_local import clock
    from billing_local.emulators.server import BackgroundServer
    from billing_local.migrate import migrate
    from billing_local.stack import local_stack

    stop = threading.Event()

    def stopping(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGINT, stopping)
    state_path = directory / STATE_FILE
    pinned = clock.pinned()
    with local_stack(lanes=True) as stack:
        if pinned is not None:  # the emulators' windows follow the pinned instant, as the commands do
            for emulator in (stack.metering, stack.gcp, stack.azure):
                emulator.clock = lambda: pinned
        asyncio.run(migrate(stack.database_url))
        lock = asyncio.Lock()

        async def refresh(_request: web.Request) -> web.Response:
            async with lock:
                count = await subscribe_every_customer(stack)
            return web.json_response({"customers": count})

        async def held(_request: web.Request) -> web.Response:
            return web.json_response(held_records(stack))

        admin = web.Application()
        admin.router.add_post("/customers/refresh", refresh)
        admin.router.add_get("/held", held)
        with BackgroundServer(admin) as admin_server:
            asyncio.run(subscribe_every_customer(stack))
            environment = {**stack.env, ADMIN_VARIABLE: admin_server.url, "BILLING_DB_TLS_VERIFY": "false"}
            if pinned is not None:  # the commands pointed at the stack read the emulators' clock
                environment[clock.VARIABLE] = pinned.isoformat().replace("+00:00", "Z")
            state = {"pid": os.getpid(), "env": environment, "log": str(directory / "stack.log")}
            temporary = state_path.with_suffix(".tmp")
            temporary.write_text(json.dumps(state))
            temporary.replace(state_path)  # whole or absent: `up` polls for it
            if announce:
                typer.echo(f"# local stack running (pid {os.getpid()}); Ctrl-C stops it", err=True)
                typer.echo(export_lines(environment))
            try:
                while not stop.wait(0.5):
                    pass
            finally:
                state_path.unlink(missing_ok=True)
    if announce:
        typer.echo("local stack stopped", err=True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]))

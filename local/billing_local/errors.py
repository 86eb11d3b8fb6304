"""Expected failures of the `billing` command line as one or two lines a person can act on.

`main` runs the typer app; an exception that `explain` recognises (settings missing, a database that is
unreachable, does not resolve, is not at its socket, offers no TLS, refuses the login or is not migrated,
a missing queue, no AWS credentials or region, a malformed BILLING_LOCAL_NOW, a timeline input without
transactions, a `Failure` a command raises) is printed as its explanation on stderr after "error: ",
and ends the process with exit 1 (runtime) or 2 (configuration / usage), without a traceback. `--debug`
(or `BILLING_DEBUG=1`) keeps the traceback. Anything not recognised is a bug and still gets its traceback.
The explanations look through the exception's causes and through exception groups (asyncio task groups
wrap the failure of one task).
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from typer._click.exceptions import UsageError

USAGE = 2
RUNTIME = 1
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


@dataclass(frozen=True)
class Explanation:
    message: str
    exit_code: int


class Failure(Exception):
    """An expected failure a command has put into words itself: printed after "error: ", no traceback."""

    def __init__(self, message: str, exit_code: int = RUNTIME) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, its causes and contexts, and the members of every exception group among them."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            stack.extend(reversed(current.exceptions))
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                stack.append(linked)


def _socket_path(dsn: str) -> str | None:
    """The Unix socket a DSN names (libpq's rule: a host that is a directory holds ``.s.PGSQL.PORT``), or
    None for a TCP DSN."""
    parts = urlsplit(dsn)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    host = query.get("host") or parts.hostname
    if not host or not host.startswith("/"):
        return None
    port = query.get("port") or (str(parts.port) if parts.port else "5432")
    return f"{host.rstrip('/')}/.s.PGSQL.{port}"


def _database_place() -> str:
    """host:port (or the socket's path) of DATABASE_URL, never its password."""
    dsn = os.environ.get("DATABASE_URL", "")
    if not dsn:
        return "the configured database"
    try:
        if (path := _socket_path(dsn)) is not None:
            return path
        parts = urlsplit(dsn)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        host = query.get("host") or parts.hostname or "localhost"
        port = query.get("port") or parts.port or 5432
    except ValueError:
        return "the configured database"
    return f"{host}:{port}"


def _database_host() -> str:
    """The database host as the message names it: DATABASE_URL's host name (never its password)."""
    try:
        parts = urlsplit(os.environ.get("DATABASE_URL", ""))
        host = parse_qs(parts.query).get("host", [parts.hostname or ""])[-1]
    except ValueError:
        host = ""
    return f"the database host {host!r}" if host else "the database host"


def _raised_by_asyncpg(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while asyncpg connected (its frames are in the traceback): a missing
    file or a failed name lookup there is the database's, not a report's or a queue's."""
    tb = exc.__traceback__
    while tb is not None:
        if f"{os.sep}asyncpg{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _local_stack_socket(path: str) -> bool:
    """A socket of the local stack's embedded PostgreSQL (its temporary folders' prefixes), or any socket
    while the local stack's environment is exported."""
    local = ("billing-pg-", "billing-runtime-")  # stack.embedded_postgres's folders
    return any(prefix in path for prefix in local) or bool(os.environ.get("BILLING_LOCAL_ADMIN_URL"))


def _database_connection(exc: BaseException) -> Explanation | None:
    """A connection to the database that failed before PostgreSQL answered: which address, and what to do."""
    if isinstance(exc, socket.gaierror):
        return Explanation(
            f"{_database_host()} does not resolve ({exc.strerror}): fix DATABASE_URL's host",
            RUNTIME,
        )
    place = _database_place()
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError) and place.startswith("/"):
        hint = (
            "the local stack is not running: start it with `billing local up`, then "
            'eval "$(billing local env)"'
            if _local_stack_socket(place)
            else "is PostgreSQL running with that socket? (check DATABASE_URL's host and port)"
        )
        missing = "no socket" if isinstance(exc, FileNotFoundError) else "nobody listening"
        return Explanation(f"database unreachable: {missing} at {place}; {hint}", RUNTIME)
    if isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc):
        # asyncpg's words when the server answers the SSLRequest with "N" (connect_utils.py)
        return Explanation(
            f"the database at {place} does not offer TLS, and a TCP connection must verify the server's "
            "certificate: for a local database without TLS set BILLING_DB_TLS_VERIFY=false (or connect "
            "through its Unix socket); otherwise enable TLS on the server (README, TLS and secret rotation)",
            USAGE,
        )
    return None


def _database_name() -> tuple[str, str]:
    try:
        parts = urlsplit(os.environ.get("DATABASE_URL", ""))
        return (parts.path.lstrip("/") or "?", parts.username or "?")
    except ValueError:
        return ("?", "?")


def _no_stack_hint() -> str:
    """Where to get a stack, when nothing says where one is (a newcomer outside `make demo`)."""
    database = any(
        os.environ.get(v) for v in ("DATABASE_URL", "BILLING_DATABASE_URL", "BILLING_DATABASE_SECRET_ARN")
    )
    queues = any(k.startswith("BILLING_") and k.endswith("QUEUE_URL") and v for k, v in os.environ.items())
    if database and queues:
        return ""
    return '; for a local stack, run `billing local up`, then `eval "$(billing local env)"`'


def explain(exc: BaseException) -> Explanation | None:
    """What went wrong and what to do, for a failure a person can fix; None for a bug."""
    for each in _chain(exc):
        found = _explain_one(each)
        if found is not None:
            return found
    return None


def _explain_one(exc: BaseException) -> Explanation | None:
    import asyncpg
    import botocore.exceptions

    from billing.domain.errors import ConfigurationError
    from billing_local.clock import ClockError
    from billing_local.timeline import TimelineInputError

    if isinstance(exc, Failure):
        return Explanation(exc.message, exc.exit_code)
    if isinstance(exc, ClockError | TimelineInputError):  # an input of the command's: its own words
        return Explanation(str(exc), USAGE)
    if isinstance(exc, OSError) and _raised_by_asyncpg(exc):
        found = _database_connection(exc)
        if found is not None:
            return found
    if isinstance(exc, ConfigurationError):
        return Explanation(f"configuration error: {exc}{_no_stack_hint()}", USAGE)
    if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
        return Explanation(
            f"configuration error: DATABASE_URL is not a PostgreSQL DSN ({exc}); "
            "expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE",
            USAGE,
        )
    db, user = _database_name()
    place = _database_place()
    if isinstance(exc, asyncpg.exceptions.InvalidPasswordError):
        return Explanation(
            f"the database at {place} refused the password of role {user!r}: fix DATABASE_URL's password",
            RUNTIME,
        )
    if isinstance(exc, asyncpg.exceptions.InvalidCatalogNameError):
        return Explanation(
            f"database {db!r} does not exist at {place}: create it or fix DATABASE_URL's database name",
            RUNTIME,
        )
    if isinstance(exc, asyncpg.exceptions.InvalidAuthorizationSpecificationError):
        return Explanation(
            f"the database at {place} refused role {user!r} ({exc}): fix DATABASE_URL's user", RUNTIME
        )
    if isinstance(exc, asyncpg.exceptions.UndefinedTableError):
        return Explanation(
            f"the database at {place} is not migrated ({exc}): run `billing db migrate`", RUNTIME
        )
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return Explanation(
            "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); "
            'for the local stack: eval "$(billing local env)"',
            RUNTIME,
        )
    if isinstance(exc, botocore.exceptions.NoRegionError):
        # botocore reads AWS_DEFAULT_REGION; AWS_REGION only inside Lambda (configprovider.py)
        return Explanation(
            "no AWS region: set AWS_DEFAULT_REGION (e.g. us-east-1; outside Lambda the SDK does not read "
            "AWS_REGION) or a region in AWS_PROFILE's config; for the local stack: "
            'eval "$(billing local env)"',
            USAGE,
        )
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}:
            return Explanation(
                f"the queue does not exist ({exc.response.get('Error', {}).get('Message', code)}): "
                "check BILLING_QUEUE_URL / BILLING_<MARKETPLACE>_QUEUE_URL",
                RUNTIME,
            )
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return Explanation(f"{exc}: check AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_SQS", RUNTIME)
    if isinstance(exc, ConnectionRefusedError | TimeoutError) or (
        isinstance(exc, OSError) and exc.errno is None and "connect" in str(exc).lower()
    ):
        return Explanation(
            f"database unreachable at {place} ({type(exc).__name__}): is PostgreSQL running there? "
            "(check DATABASE_URL)",
            RUNTIME,
        )
    return None


def debugging(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("BILLING_DEBUG", "").lower() in {"1", "true", "yes"}


def usage_message(exc: UsageError) -> str:
    """Click's message for a usage error, without the prefix pydantic puts on a validator's ValueError.

    typer (0.29 here) converts parameters with pydantic, whose message for a ValueError raised while
    validating (an enum value not among the choices) begins "Value error, ": it names the exception
    class, not the problem.
    """
    return _PYDANTIC_PREFIX.sub("", exc.format_message())


_PYDANTIC_PREFIX = re.compile(r"(?<=: )Value error, |^Value error, ")


def run(app: Callable[..., object], argv: list[str] | None = None) -> None:
    """Run the app; an expected failure becomes its explanation and exit code (a traceback with --debug)."""
    args = sys.argv[1:] if argv is None else argv
    debug = debugging(args)
    if "--debug" in args:
        # a global flag wherever it is written: typer's own parser never sees it
        sys.argv[1:] = [a for a in args if a != "--debug"]
    # typer (0.22+) carries its own copy of click; its exception classes are those the app raises
    import typer
    from typer._click import exceptions as click_errors

    try:
        # click's standalone mode would print a usage error as a framed box of five lines or more; here
        # it is one line, with where to look next
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        raise SystemExit(exc.exit_code) from None  # typer has printed the help already
    except click_errors.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "billing"
        sys.stderr.write(f"error: {usage_message(exc)}\n(see `{where} --help`)\n")
        raise SystemExit(USAGE) from None
    except click_errors.ClickException as exc:
        sys.stderr.write(f"error: {exc.format_message()}\n")
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        sys.stderr.write("aborted\n")
        raise SystemExit(1) from None
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        found = explain(exc)
        if found is None or debug:
            raise
        sys.stderr.write(f"error: {found.message}\n")
        raise SystemExit(found.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)

"""Operator commands: `billing redrive`, `billing status`, `billing reconcile`.

``register(app)`` adds them to the `billing` command line. Redrive moves dead-letter messages back to
the billing queue (SQS StartMessageMoveTask, or receive/send/delete where the endpoint lacks it);
status and reconcile read the ledger (billing_local.report) and exit non-zero when something is
wrong, so they can serve as checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from billing_local import clock as local_clock
from billing_local import errors

if TYPE_CHECKING:
    from billing.domain.model import Period

console = Console(stderr=True, soft_wrap=True)  # a message is one line, never broken mid-sentence

MOVE_TASK = "StartMessageMoveTask"
BY_HAND = "receive, send, delete"
# What an endpoint answers for an action it does not implement: moto gives an HTML 500, so botocore
# puts the HTTP status itself in place of an error code.
_NO_SUCH_ACTION = frozenset({"NotImplemented", "InvalidAction", "UnknownOperationException"})
_SENDABLE_ATTRIBUTE_FIELDS = ("DataType", "StringValue", "BinaryValue")
SEND_BATCH = 10  # SendMessageBatch's and ReceiveMessage's limit


def register(app: typer.Typer) -> None:
    """Add `redrive`, `status` and `reconcile` to the app."""
    app.command("redrive")(redrive_command)
    app.command("status")(status_command)
    app.command("reconcile")(reconcile_command)


# --- redrive ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueRef:
    url: str
    arn: str


@dataclass
class RedriveResult:
    method: str  # MOVE_TASK or BY_HAND
    moved: int = 0
    status: str = "COMPLETED"  # the move task's final status (COMPLETED, CANCELLED, FAILED, ...)
    task_handle: str | None = None
    failure_reason: str | None = None
    left: dict[str, str] = field(default_factory=dict)  # message id -> why its send failed (kept in the DLQ)
    not_deleted: int = 0  # sent, but the DLQ delete failed: moved again next time (billing is idempotent)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.left and not self.interrupted and self.status == "COMPLETED"


Progress = Callable[[int], Any]


def redrive(
    sqs: Any,
    dlq: QueueRef,
    queue: QueueRef,
    *,
    rate: int | None = None,
    probe: Any = None,
    wait_seconds: int = 2,
    visibility_seconds: int = 120,
    poll_seconds: float = 2.0,
    progress: Callable[[str, int], Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> RedriveResult:
    """Move every message of ``dlq`` back to ``queue``; Ctrl-C cancels (a move task) or stops cleanly.

    ``sqs`` is a boto3 SQS client; ``probe`` one that does not retry, used to find out fast whether
    the endpoint implements StartMessageMoveTask (moto does not).
    """
    from botocore.exceptions import ClientError

    bar = progress or _progress
    total = int(
        sqs.get_queue_attributes(QueueUrl=dlq.url, AttributeNames=["ApproximateNumberOfMessages"])[
            "Attributes"
        ]["ApproximateNumberOfMessages"]
    )
    args: dict[str, Any] = {"SourceArn": dlq.arn, "DestinationArn": queue.arn}
    if rate:
        args["MaxNumberOfMessagesPerSecond"] = rate
    try:
        handle = (probe or sqs).start_message_move_task(**args)["TaskHandle"]
    except ClientError as exc:
        if not _action_missing(exc):
            raise
        with bar("moving messages by hand", total) as advance:
            return _move_by_hand(
                sqs, dlq, queue, rate, wait_seconds, visibility_seconds, advance, sleep, clock
            )
    with bar("moving messages (StartMessageMoveTask)", total) as advance:
        return _follow_task(sqs, dlq, handle, poll_seconds, advance, sleep)


def _action_missing(exc: Any) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    return code in _NO_SUCH_ACTION or (status in (500, 501) and code == str(status))


def _follow_task(
    sqs: Any,
    dlq: QueueRef,
    handle: str,
    poll_seconds: float,
    advance: Progress,
    sleep: Callable[[float], None],
) -> RedriveResult:
    """Poll ListMessageMoveTasks until the task ends; Ctrl-C cancels it with CancelMessageMoveTask."""
    result = RedriveResult(MOVE_TASK, task_handle=handle, status="RUNNING")
    try:
        while True:
            task = _task(sqs, dlq, handle)
            if task is not None:
                moved = int(task.get("ApproximateNumberOfMessagesMoved", 0))
                advance(moved - result.moved)
                result.moved = moved
                result.status = task.get("Status", result.status)
                result.failure_reason = task.get("FailureReason")
            if result.status not in ("RUNNING", "CANCELLING"):
                return result
            sleep(poll_seconds)
    except KeyboardInterrupt:
        cancelled = sqs.cancel_message_move_task(TaskHandle=handle)
        result.moved = int(cancelled.get("ApproximateNumberOfMessagesMoved", result.moved))
        result.status, result.interrupted = "CANCELLING", True
        return result


def _task(sqs: Any, dlq: QueueRef, handle: str) -> dict[str, Any] | None:
    tasks = sqs.list_message_move_tasks(SourceArn=dlq.arn, MaxResults=10).get("Results", [])
    return next((t for t in tasks if t.get("TaskHandle") == handle), tasks[0] if tasks else None)


def _move_by_hand(
    sqs: Any,
    dlq: QueueRef,
    queue: QueueRef,
    rate: int | None,
    wait_seconds: int,
    visibility_seconds: int,
    advance: Progress,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> RedriveResult:
    """Receive from the DLQ, send to the queue, delete from the DLQ only what was sent.

    An interruption between send and delete leaves a copy in both queues (billing is idempotent);
    no order of events deletes a message that was not sent.
    """
    result = RedriveResult(BY_HAND)
    began = clock()
    held: dict[str, str] = {}  # message id -> latest receipt handle of messages whose send failed
    try:
        while True:
            if rate:  # MaxNumberOfMessagesPerSecond, applied by hand
                ahead = result.moved / rate - (clock() - began)
                if ahead > 0:
                    sleep(ahead)
            got = sqs.receive_message(
                QueueUrl=dlq.url,
                MaxNumberOfMessages=min(SEND_BATCH, rate or SEND_BATCH),
                WaitTimeSeconds=wait_seconds,
                VisibilityTimeout=visibility_seconds,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["All"],
            ).get("Messages", [])
            for m in got:
                if m["MessageId"] in held:
                    held[m["MessageId"]] = m["ReceiptHandle"]
            fresh = [m for m in got if m["MessageId"] not in result.left]
            if not fresh:  # empty, or only messages whose send already failed once
                break
            _move_batch(sqs, dlq, queue, fresh, result, held, advance)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        _release(sqs, dlq, held)
    return result


def _move_batch(
    sqs: Any,
    dlq: QueueRef,
    queue: QueueRef,
    messages: list[dict[str, Any]],
    result: RedriveResult,
    held: dict[str, str],
    advance: Progress,
) -> None:
    by_id = {str(i): m for i, m in enumerate(messages)}
    sent = sqs.send_message_batch(QueueUrl=queue.url, Entries=[_send_entry(i, m) for i, m in by_id.items()])
    for failed in sent.get("Failed", []):
        m = by_id[failed["Id"]]
        result.left[m["MessageId"]] = f"{failed.get('Code', '?')}: {failed.get('Message', '')}".rstrip(": ")
        held[m["MessageId"]] = m["ReceiptHandle"]
    done = [by_id[ok["Id"]] for ok in sent.get("Successful", [])]
    if not done:
        return
    deleted = sqs.delete_message_batch(
        QueueUrl=dlq.url,
        Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)],
    )
    result.not_deleted += len(deleted.get("Failed", []))
    result.moved += len(done)
    advance(len(done))


def _send_entry(ident: str, m: dict[str, Any]) -> dict[str, Any]:
    """The message as it was sent: body, message attributes, trace header (and FIFO ids)."""
    entry: dict[str, Any] = {"Id": ident, "MessageBody": m["Body"]}
    if m.get("MessageAttributes"):
        entry["MessageAttributes"] = {
            name: {k: v for k, v in value.items() if k in _SENDABLE_ATTRIBUTE_FIELDS}
            for name, value in m["MessageAttributes"].items()
        }
    system = m.get("Attributes", {})
    if "AWSTraceHeader" in system:
        entry["MessageSystemAttributes"] = {
            "AWSTraceHeader": {"DataType": "String", "StringValue": system["AWSTraceHeader"]}
        }
    for name in ("MessageGroupId", "MessageDeduplicationId"):
        if name in system:
            entry[name] = system[name]
    return entry


def _release(sqs: Any, dlq: QueueRef, held: dict[str, str]) -> None:
    """Make the messages whose send failed visible in the DLQ again at once (best effort)."""
    from botocore.exceptions import BotoCoreError, ClientError

    handles = list(held.values())
    for start in range(0, len(handles), SEND_BATCH):
        entries = [
            {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": 0}
            for i, h in enumerate(handles[start : start + SEND_BATCH])
        ]
        # on failure they come back by themselves when their visibility timeout ends
        with contextlib.suppress(BotoCoreError, ClientError):
            sqs.change_message_visibility_batch(QueueUrl=dlq.url, Entries=entries)


def _progress(label: str, total: int) -> Any:
    from billing_local.progress import progress_bar

    return progress_bar(label, total)


def resolve_queue(sqs: Any, url: str | None, arn: str | None, what: str) -> QueueRef:
    """A queue from its URL or its ARN (the other one is looked up)."""
    if url:
        found = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        return QueueRef(url, found)
    if arn:
        parts = arn.split(":")
        if len(parts) != 6 or parts[2] != "sqs":
            raise typer.BadParameter(f"not an SQS queue ARN: {arn!r}")
        found = sqs.get_queue_url(QueueName=parts[5], QueueOwnerAWSAccountId=parts[4])["QueueUrl"]
        return QueueRef(found, arn)
    raise typer.BadParameter(f"the {what} is not set: pass its URL or ARN")


def _sqs_clients() -> tuple[Any, Any]:
    """A retrying client, and a single-attempt one that probes StartMessageMoveTask."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    sqs = session.client("sqs", config=Config(retries={"mode": "standard", "total_max_attempts": 5}))
    probe = session.client("sqs", config=Config(retries={"mode": "standard", "total_max_attempts": 1}))
    return sqs, probe


def redrive_command(
    dlq_url: Annotated[
        str | None,
        typer.Option("--dlq-url", envvar="BILLING_DLQ_URL", help="The dead-letter queue to empty."),
    ] = None,
    source_arn: Annotated[
        str | None,
        typer.Option(
            "--source-arn", "--dlq-arn", help="The dead-letter queue by ARN (instead of --dlq-url)."
        ),
    ] = None,
    queue_url: Annotated[
        str | None,
        typer.Option(
            "--queue-url", envvar="BILLING_QUEUE_URL", help="The billing queue to move messages to."
        ),
    ] = None,
    destination_arn: Annotated[
        str | None,
        typer.Option("--destination-arn", help="The billing queue by ARN (instead of --queue-url)."),
    ] = None,
    rate: Annotated[
        int | None,
        typer.Option(
            min=1, max=500, help="At most this many messages a second (MaxNumberOfMessagesPerSecond)."
        ),
    ] = None,
    wait_seconds: Annotated[
        int, typer.Option(min=0, max=20, help="Long-poll wait when moving by hand (no move-task API).")
    ] = 2,
    lane: Annotated[
        str | None,
        typer.Option(
            "--lane",
            help="aws, gcp or azure: that lane's dead-letter queue (BILLING_<LANE>_DLQ_URL) to its own queue "
            "(BILLING_<LANE>_QUEUE_URL).",
        ),
    ] = None,
) -> None:
    """Move the dead-letter queue's messages back to the billing queue (safe: billing is idempotent)."""
    if lane is not None:
        if lane not in ("aws", "gcp", "azure"):
            raise typer.BadParameter("aws, gcp or azure", param_hint="--lane")
        # each lane's DLQ goes back to its own queue, never to another marketplace's lane
        dlq_url = os.environ.get(f"BILLING_{lane.upper()}_DLQ_URL", dlq_url if source_arn else None)
        queue_url = os.environ.get(
            f"BILLING_{lane.upper()}_QUEUE_URL", queue_url if destination_arn else None
        )
    if lane is None and not dlq_url and not source_arn:
        lanes = [m for m in ("aws", "gcp", "azure") if os.environ.get(f"BILLING_{m.upper()}_DLQ_URL")]
        if lanes:  # the local stack (and the deployed template) has one dead-letter queue per lane
            raise typer.BadParameter(
                f"which lane's dead-letter queue? BILLING_DLQ_URL is not set, but {len(lanes)} lane(s) "
                f"have one: --lane {'|'.join(lanes)}",
                param_hint="'--lane'",
            )
    sqs, probe = _sqs_clients()
    dlq = resolve_queue(
        sqs, None if source_arn else dlq_url, source_arn, "dead-letter queue (BILLING_DLQ_URL)"
    )
    queue = resolve_queue(
        sqs, None if destination_arn else queue_url, destination_arn, "billing queue (BILLING_QUEUE_URL)"
    )
    from botocore.exceptions import ClientError

    try:
        result = redrive(sqs, dlq, queue, rate=rate, probe=probe, wait_seconds=wait_seconds)
    except ClientError as exc:  # e.g. a move task already running on this queue
        error = exc.response.get("Error", {})
        console.print(
            f"[red]SQS refused[/red] {escape(str(error.get('Code')))}: {escape(str(error.get('Message')))}"
        )
        raise typer.Exit(1) from None
    typer.echo(f"moved {result.moved} message(s) from {dlq.arn} to {queue.arn} ({result.method})")
    if result.method == MOVE_TASK:
        typer.echo(f"task {result.task_handle}: {result.status}")
    if result.failure_reason:
        console.print(f"[red]the move task failed[/red]: {escape(result.failure_reason)}")
    if result.not_deleted:
        typer.echo(
            f"{result.not_deleted} sent message(s) could not be deleted from the DLQ (moved again next time)"
        )
    for message_id, reason in sorted(result.left.items()):
        console.print(f"[red]left in the dead-letter queue[/red] {message_id}: {escape(reason)}")
    if result.interrupted:
        console.print("interrupted: " + ("move task cancelled" if result.method == MOVE_TASK else "stopped"))
        raise typer.Exit(errors.INTERRUPTED)
    if not result.ok:
        raise typer.Exit(1)


# --- status ----------------------------------------------------------------------------------------


EXAMPLE_HOUR = "2026-11-26T13:00:00Z"


def parse_period(text: str, option: str = "--period") -> Period:
    """An hour given on the command line, or a usage error naming ``option`` with an example."""
    from datetime import UTC, datetime

    from billing.domain.model import Period

    hint = f"'{option}'"
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not an hour: give one in UTC, e.g. {EXAMPLE_HOUR}", param_hint=hint
        ) from None
    if moment.tzinfo is None:
        raise typer.BadParameter(
            f"{text!r} has no time zone: give the full form, e.g. {moment:%Y-%m-%dT%H:00:00}Z",
            param_hint=hint,
        )
    try:
        return Period(moment.astimezone(UTC))
    except ValueError as exc:  # not on the hour, out of range: echoed in UTC with "Z", as it is typed
        raise typer.BadParameter(str(exc).replace("+00:00", "Z"), param_hint=hint) from None


def require_ended(hour: Any, option: str = "--period", what: str = "bill an hour that has ended") -> None:
    """An hour is billed (and checked) once it has ended, by the local tooling's clock
    (billing_local.clock: BILLING_LOCAL_NOW when pinned): before that its usage is not all there."""
    from billing_local import clock

    now = clock.now()  # a malformed BILLING_LOCAL_NOW: a ClockError, one line from billing_local.errors
    if not hour.has_ended(now):
        pinned = f", {clock.VARIABLE}" if clock.pinned() is not None else ""
        raise typer.BadParameter(
            f"{hour} has not ended yet (now {now.strftime('%Y-%m-%dT%H:%M:%SZ')}{pinned}): {what}",
            param_hint=f"'{option}'",
        )


def _settings(pool_max: int = 2) -> Any:
    from billing.config import load_settings

    settings = load_settings()  # a ConfigurationError is one "error: " line from billing_local.errors
    return settings.model_copy(update={"db_pool_max": max(settings.db_pool_max, pool_max)})


async def _status(period: Any) -> tuple[Any, list[Any]]:
    from billing.adapters.postgres import PostgresBillingRepository
    from billing.bootstrap import Runtime
    from billing.domain.model import Marketplace
    from billing_local.capacity import lane_capacities
    from billing_local.report import period_status

    settings = _settings()
    runtime = Runtime(settings)
    try:
        pool = await runtime.pool()
        status = await period_status(pool, period)
        card = await PostgresBillingRepository(pool).rate_card()
        lanes = lane_capacities(
            {m.value: getattr(settings, f"{m.value}_quota_per_second") for m in Marketplace},
            {m.value: len(card.dimensions(m)) for m in Marketplace},
            {name: counts.customers for name, counts in status.report.marketplaces.items()},
        )
        return status, lanes
    finally:
        await runtime.close()


def status_command(
    period: Annotated[str, typer.Option(help="The hour, e.g. 2026-11-26T13:00:00Z.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
    limit: Annotated[int, typer.Option(min=1, help="Problems to list (all of them with --json).")] = 50,
) -> None:
    """Check an hour: counts per marketplace and state, missing customers, failures with reasons, and
    each lane's capacity at its quota (customers per hour, this hour's customers, the margin).

    Exits 1 when a billable customer has no complete ledger or a record was rejected, failed or
    expired with a submission the marketplace may have received; 2 for an hour that has not ended.
    """
    hour = parse_period(period)
    require_ended(hour, what="check an hour that has ended")
    status, lanes = asyncio.run(_status(hour))
    if as_json:
        typer.echo(
            json.dumps({**status.as_dict(), "lanes": {c.marketplace: c.as_dict() for c in lanes}}, indent=2)
        )
    else:
        for line in _status_lines(status, limit):
            typer.echo(line)
        # capacity at each lane's quota (BILLING_<MARKETPLACE>_QUOTA_PER_SECOND, the template's defaults)
        for capacity in lanes:
            typer.echo(capacity.line())
    if not status.ok:
        raise typer.Exit(1)


def _status_lines(status: Any, limit: int) -> Iterator[str]:
    from billing.domain.model import LedgerState

    r = status.report
    blocking = [p for p in status.problems if p.blocking]
    yield f"hour {r.period}: " + (
        "clean"
        if status.ok
        else f"NOT CLEAN ({len(r.unbilled)} customer(s) missing, {len(blocking)} problem(s))"
    )
    run = status.run
    if run is None:
        yield "run: none (the hour was never dispatched)"
    else:
        finished = f"finished {run.dispatched_at}" if run.dispatched_at else "NOT finished"
        resent = f", resent {run.resent}" if run.resent else ""
        yield (
            f"run {run.run_id}: dispatched {run.dispatched} customer(s){resent}, {finished}, "
            f"attempt {run.attempts}"
        )
    for name in sorted(set(r.marketplaces) | set(r.states)):
        counts = r.marketplaces.get(name)
        states = ", ".join(f"{s.value} {r.count(s, name)}" for s in LedgerState if r.count(s, name))
        customers = (
            f"{counts.customers} billable, {counts.billed} billed, {len(counts.missing)} missing"
            if counts
            else "0 billable"
        )
        yield f"{name}: customers {customers}; records {states or 'none'}"
    for problem in status.problems[:limit]:
        yield "  " + problem.line()
    if len(status.problems) > limit:
        yield f"  ... and {len(status.problems) - limit} more (--limit, or --json for all)"


# --- reconcile -------------------------------------------------------------------------------------


async def _reconcile(start: Any, end: Any, customer: str | None, show_progress: bool) -> Any:
    from billing.adapters.postgres_reconcile import PostgresReconcileReader
    from billing.bootstrap import Runtime
    from billing.services.reconcile import reconcile
    from billing_local.progress import progress_bar

    settings = _settings(pool_max=8)
    runtime = Runtime(settings)
    try:
        pool = await runtime.pool()
        known = customer is None or await pool.fetchval("SELECT 1 FROM customers WHERE id = $1", customer)
        if not known:
            # else the scope is empty and the answer would be "clean: 0 of 0"
            raise typer.BadParameter(
                f"no customer {customer!r} in the customers table", param_hint="--customer"
            )
        usage = await runtime.usage_source()
        return await reconcile(
            PostgresReconcileReader(pool),
            usage,
            start,
            end,
            lookback_hours=settings.lookback_hours,
            settle=settings.settle_delay,
            now=local_clock.now(),  # BILLING_LOCAL_NOW when pinned (billing_local.clock)
            usage_source=settings.usage_source.value,
            customer=customer,
            concurrency=settings.db_pool_max,
            progress=progress_bar if show_progress else None,
        )
    finally:
        await runtime.close()


def reconcile_command(
    start: Annotated[str, typer.Option("--from", help="The first hour, e.g. 2026-11-26T00:00:00Z.")],
    end: Annotated[str, typer.Option("--to", help="The last hour, included.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print every customer and dimension as JSON.")
    ] = False,
    customer: Annotated[str | None, typer.Option(help="Only this customer.")] = None,
    limit: Annotated[
        int, typer.Option(min=0, help="At most this many customer-dimensions' details (--json: all).")
    ] = 20,
) -> None:
    """Reconcile usage-source totals with the ledger per customer and dimension: totals, then the
    differences (unexplained first).

    Exits 1 when a difference is unexplained (a rejected or unsettled quantity, a changed ledger row,
    a broken carry chain, late usage that will never be billed).
    """
    first, last = parse_period(start, "--from"), parse_period(end, "--to")
    if last < first:
        raise typer.BadParameter(f"--to {last} is before --from {first}")
    result = asyncio.run(_reconcile(first, last, customer, show_progress=not as_json and sys.stderr.isatty()))
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
    else:
        from billing_local.render import iter_lines

        for line in iter_lines(result, limit):
            typer.echo(line)
    if not result.clean:
        raise typer.Exit(1)

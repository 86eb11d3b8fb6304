"""The local runner: a fixed pool of consumers draining the billing queue, like Lambda's poller.

Pollers receive messages (10 a call, once 10 places are free: at most one batch per poller waits
ahead of the consumers) and hand them to ``concurrency`` consumers. Each consumer runs the same async
code the biller Lambda runs on one message at a time (the template's BatchSize 1); a billed message
is deleted (10 to a DeleteMessageBatch, one call at a time), a failed one is left for redelivery, so
SQS's redrive policy moves a message that keeps failing to the dead-letter queue. Concurrency is a
fixed number of consumers, not a semaphore over thousands of waiting tasks: a message waits in the
queue (or the inbox), not inside its measured work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from billing.collector import settle_after_init
from billing.domain.model import BillOutcome

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping


SQS_MAX_RECEIVE = 10
logger = logging.getLogger(__name__)

# The local runner's APM agent, configured like template.yaml's (the settings that shape the events);
# events are captured locally (billing_local.apm_capture) instead of sent to an APM Server.
APM_SETTINGS: dict[str, Any] = {
    "environment": "local",
    "transport_class": "billing_local.apm_capture.CaptureTransport",
    "transport_json_serializer": "billing.apm_json.dumps",  # as template.yaml (billing.apm_json)
    "metrics_interval": "0ms",
    "metrics_sets": [],
    "breakdown_metrics": False,
    "central_config": False,
    "cloud_provider": "none",
    "span_compression_enabled": False,  # keep one span per query and per marketplace call
    "collect_local_variables": "off",  # frame locals would carry the DSN into error events
    # no stack trace on spans, as in template.yaml (error events keep theirs); "0ms" gives every span one
    "span_stack_trace_min_duration": "-1ms",
    "framework_name": "local runner",
}


@dataclass
class RunnerStats:
    invocations: int = 0
    succeeded: int = 0
    failed: int = 0
    outcomes: list[BillOutcome] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)  # seconds per invocation, transaction included
    work: list[float] = field(default_factory=list)  # seconds inside the handler, per invocation
    message_ids: list[str] = field(default_factory=list)  # the message of each invocation
    completed: dict[str, float] = field(default_factory=dict)  # customer -> perf_counter when billed
    started: float = 0.0
    finished: float = 0.0

    @property
    def makespan(self) -> float:
        return self.finished - self.started


@dataclass(frozen=True)
class Delivery:
    """One received message, as the consumer sees it."""

    body: str
    message_id: str
    receipt_handle: str
    receive_count: int
    attributes: dict[str, Any]
    message_attributes: dict[str, Any]


class LeakedCancellationError(RuntimeError):
    """The handler raised CancelledError though nothing cancelled its consumer."""


async def _handled(handle: Callable[[Delivery], Awaitable[BillOutcome]], delivery: Delivery) -> BillOutcome:
    """``handle(delivery)``, with a CancelledError nothing asked for turned into an ordinary failure.

    CancelledError is not an ``Exception``: leaking from a library, it would end its consumer silently
    (a TaskGroup ignores a cancelled child) and leave the message in flight for the queue's whole
    visibility timeout. Lambda would fail the invocation and SQS redeliver the message; so does this.
    """
    try:
        return await handle(delivery)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise LeakedCancellationError(
            f"message {delivery.message_id}: the handler raised CancelledError, nothing cancelled it"
        ) from None


@contextlib.contextmanager
def lambda_like_transaction(client: Any, queue_name: str, delivery: Delivery) -> Iterator[None]:
    """One APM transaction per message, shaped like capture_serverless's for a 1-record SQS event.

    It begins when a consumer picks the message up (the queue wait is the message age, outside the
    transaction) and links to the sender's span through the ``traceparent`` message attribute.
    """
    if client is None:
        yield
        return
    import elasticapm
    from elasticapm.utils.disttracing import TraceParent

    traceparent = delivery.message_attributes.get("traceparent", {}).get("StringValue")
    links = [TraceParent.from_string(traceparent)] if traceparent else []
    client.begin_transaction("messaging", links=[link for link in links if link])
    elasticapm.set_transaction_name(f"RECEIVE {queue_name}", override=False)
    message: dict[str, Any] = {"queue": {"name": queue_name}}
    if sent := delivery.attributes.get("SentTimestamp"):
        message["age"] = {"ms": int(time.time() * 1000) - int(sent)}
    elasticapm.set_context(message, "message")
    elasticapm.set_context({"trigger": {"type": "pubsub", "request_id": delivery.message_id}}, "faas")
    elasticapm.set_context({"origin": {"name": queue_name}}, "service")
    try:
        yield
    except Exception:
        elasticapm.set_transaction_outcome("failure", override=False)
        raise
    finally:
        client.end_transaction()


async def _retry_later(sqs: Any, queue_url: str, delivery: Delivery, delay_s: int) -> None:
    """Make a failed message visible again after ``delay_s`` (Lambda's retry, sooner than 360 s)."""
    try:
        await sqs.change_message_visibility(
            QueueUrl=queue_url, ReceiptHandle=delivery.receipt_handle, VisibilityTimeout=delay_s
        )
    except Exception:  # it comes back after the queue's visibility timeout instead
        logger.warning("could not shorten a failed message's visibility", exc_info=True)


async def drain(
    sqs: Any,
    queue_url: str,
    handle: Callable[[Delivery], Awaitable[BillOutcome]],
    concurrency: int,
    retry_delay_s: int = 1,
    wait_time_s: int = 1,
    progress: Callable[[RunnerStats], None] | None = None,
    apm_client: Any = None,
    pollers_count: int = 1,
    interrupt: asyncio.Event | None = None,
) -> RunnerStats:
    """Consume until the queue is empty and nothing is in flight (failed messages included).

    ``interrupt`` (Ctrl-C): once set, nothing more is received, the messages received and not yet
    started are made visible again at once (a rerun takes them), and the drain returns when the bills
    in flight have finished; the caller bounds that wait (billing_local.local_run.run_hour).

    One poller by default: moto's ReceiveMessage is not safe under concurrent calls (it can hand one
    message to two receivers, or hide one for a whole visibility timeout), and one poller taking ten
    messages a call keeps fifty consumers busy. Against real SQS more pollers are fine.
    """
    queue_name = queue_url.rstrip("/").rsplit("/", 1)[-1]
    # What is alive now (modules, pools, clients, the agent) lives as long as the process: out of the
    # collector's reach, a full collection during the drain scans only what the bills allocate; and
    # young collections run as rarely as in a Lambda environment (billing.collector).
    settle_after_init()
    stats = RunnerStats(started=time.perf_counter())
    batch = min(SQS_MAX_RECEIVE, concurrency)
    # Free consumers plus one receive batch per poller: a poller asks for a full batch once that many
    # places are free, so a message costs a tenth of a ReceiveMessage, not a whole one. A message that
    # waits in the inbox waits outside its transaction (its age shows it), as it would in the queue.
    credits = asyncio.Semaphore(concurrency + batch * pollers_count)
    held = 0  # messages received and not yet deleted or released
    idle = asyncio.Event()  # nothing held
    idle.set()
    inbox: asyncio.Queue[Delivery | None] = asyncio.Queue()
    finished: asyncio.Queue[str] = asyncio.Queue()  # receipt handles of billed messages, to delete
    stop = asyncio.Event()

    async def queue_empty() -> bool:
        attrs = await sqs.get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )
        return all(int(v) == 0 for v in attrs["Attributes"].values())

    def hold(n: int) -> None:
        nonlocal held
        if n == 0:
            return
        held += n
        if held == 0:
            idle.set()
            stats.finished = time.perf_counter()  # the last message settled so far: the makespan's end
        else:
            idle.clear()

    async def settle() -> None:
        """Nothing held: stop as soon as the queue is empty, not when a long poll next times out."""
        if held == 0 and not stop.is_set() and await queue_empty() and held == 0:
            stop.set()

    async def release(deliveries: list[Delivery]) -> None:
        """Received but not started: visible again now, not after the queue's visibility timeout."""
        for start in range(0, len(deliveries), SQS_MAX_RECEIVE):
            chunk = deliveries[start : start + SQS_MAX_RECEIVE]
            try:
                await sqs.change_message_visibility_batch(
                    QueueUrl=queue_url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": d.receipt_handle, "VisibilityTimeout": 0}
                        for i, d in enumerate(chunk)
                    ],
                )
            except Exception:  # they come back after the visibility timeout instead
                logger.warning("could not release unstarted messages", exc_info=True)
            finally:
                for _ in chunk:
                    credits.release()
                hold(-len(chunk))

    async def interrupted() -> None:
        assert interrupt is not None
        await interrupt.wait()
        stop.set()
        waiting = []
        while not inbox.empty():
            if (delivery := inbox.get_nowait()) is not None:
                waiting.append(delivery)
        await release(waiting)

    async def poller() -> None:
        """Receives until the drain stops; never cancelled inside a ReceiveMessage (see below)."""
        while not stop.is_set():
            for _ in range(batch):
                await credits.acquire()
            if stop.is_set():  # told to stop while waiting for places (Ctrl-C): receive nothing more
                for _ in range(batch):
                    credits.release()
                break
            response = await sqs.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=batch,
                WaitTimeSeconds=wait_time_s,
                AttributeNames=["All"],
                MessageAttributeNames=["All"],
            )
            messages = response.get("Messages", [])
            for _ in range(batch - len(messages)):
                credits.release()
            hold(len(messages))  # taken after the drain was told to stop, they are billed all the same
            deliveries = [
                Delivery(
                    m["Body"],
                    m["MessageId"],
                    m["ReceiptHandle"],
                    int(m.get("Attributes", {}).get("ApproximateReceiveCount", "1")),
                    m.get("Attributes", {}),
                    m.get("MessageAttributes", {}),
                )
                for m in messages
            ]
            if interrupt is not None and interrupt.is_set():  # Ctrl-C during the receive: not started
                await release(deliveries)
                continue
            for delivery in deliveries:
                inbox.put_nowait(delivery)
            if not messages:
                await settle()

    async def deleter() -> None:
        """Deletes billed messages ten to a DeleteMessageBatch, one call at a time.

        A tenth of the calls of a DeleteMessage per message; and never two at once, which moto's
        server (5.2.5) does not survive: its DeleteMessage rebuilds the queue's message list without a
        lock, so concurrent deletes lose some and those messages come back after the visibility timeout.
        """
        while True:
            handles = [await finished.get()]
            while len(handles) < SQS_MAX_RECEIVE and not finished.empty():
                handles.append(finished.get_nowait())
            try:
                await sqs.delete_message_batch(
                    QueueUrl=queue_url,
                    Entries=[{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(handles)],
                )
            finally:  # an entry that failed to delete is delivered again, and billed as already billed
                for _ in handles:
                    credits.release()
                hold(-len(handles))
            await settle()

    async def consumer() -> None:
        while (delivery := await inbox.get()) is not None:
            began = time.perf_counter()
            work = 0.0
            billed = False
            try:
                with lambda_like_transaction(apm_client, queue_name, delivery):
                    started = time.perf_counter()
                    try:
                        outcome = await _handled(handle, delivery)
                    finally:
                        work = time.perf_counter() - started
            except Exception:  # the batch boundary: any failure leaves the message for redelivery
                stats.failed += 1
                await _retry_later(sqs, queue_url, delivery, min(retry_delay_s * delivery.receive_count, 30))
            else:
                stats.succeeded += 1
                stats.outcomes.append(outcome)
                if not outcome.requeued:  # a requeued customer completes with its copy
                    stats.completed[outcome.customer_id] = time.perf_counter()
                finished.put_nowait(delivery.receipt_handle)
                billed = True
            finally:
                stats.invocations += 1
                stats.durations.append(time.perf_counter() - began)
                stats.work.append(work)
                stats.message_ids.append(delivery.message_id)
                if not billed:
                    credits.release()
                    hold(-1)
                if progress is not None:
                    progress(stats)
            if not billed:
                await settle()

    async with asyncio.TaskGroup() as group:
        consumers = [group.create_task(consumer()) for _ in range(concurrency)]
        pollers = [group.create_task(poller()) for _ in range(pollers_count)]
        deleter_task = group.create_task(deleter())
        watcher = group.create_task(interrupted()) if interrupt is not None else None
        await stop.wait()
        # The pollers end after the ReceiveMessage they are in. Cancelled inside a long poll, the request
        # would stay open at SQS and the messages it took (the next run's, arriving within the wait) would
        # be hidden for the queue's whole visibility timeout. What they took is billed before stopping.
        await asyncio.gather(*pollers)
        await idle.wait()
        deleter_task.cancel()  # idle: waiting for handles, no DeleteMessageBatch in flight
        with contextlib.suppress(asyncio.CancelledError):
            await deleter_task
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        for _ in consumers:
            inbox.put_nowait(None)
    if not stats.finished:
        stats.finished = time.perf_counter()
    return stats


async def drain_lanes(
    sqs: Any,
    lanes: Mapping[str, tuple[str, int]],
    handle: Callable[[Delivery], Awaitable[BillOutcome]],
    progress: Callable[[RunnerStats], None] | None = None,
    **options: Any,
) -> dict[str, RunnerStats]:
    """Drain every lane at once, each from its own queue with its own pool of consumers (``lanes``: the
    lane's name -> its queue URL and concurrency), as Lambda runs one event source mapping per lane with
    its own MaximumConcurrency: a slow or throttled lane holds only its own consumers."""
    async with asyncio.TaskGroup() as group:
        tasks = {
            lane: group.create_task(drain(sqs, url, handle, concurrency, progress=progress, **options))
            for lane, (url, concurrency) in lanes.items()
        }
    return {lane: task.result() for lane, task in tasks.items()}


def merged(lanes: Iterable[RunnerStats]) -> RunnerStats:
    """The lanes' statistics as one run: counts summed, from the first start to the last finish."""
    total = RunnerStats()
    parts = list(lanes)
    for part in parts:
        total.invocations += part.invocations
        total.succeeded += part.succeeded
        total.failed += part.failed
        total.outcomes += part.outcomes
        total.durations += part.durations
        total.work += part.work
        total.message_ids += part.message_ids
        total.completed |= part.completed
    if parts:
        total.started = min(p.started for p in parts)
        total.finished = max(p.finished for p in parts)
    return total

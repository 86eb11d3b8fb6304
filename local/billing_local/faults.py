"""The faults the fault-injection suite (tests/e2e/test_fault_injection.py) and bench/chaos inject, and what
they read back.

Local tooling, never deployed. Every fault goes in through a parameter, never by patching a module:

- the composition root (``billing.bootstrap.Runtime``) takes the virtual ``Clock``, an AWS session whose
  metering clients time out soon (``ShortMarketplaceTimeouts``) and ``Wrappers`` around its real
  adapters: ``KillingLedger`` (the biller dies at a step), ``FaultyUsage`` (searches time out or are
  slow), ``DyingQueue`` (the dispatcher dies half way);
- ``billing_local.stack.local_stack`` takes a ``Gate`` middleware per emulator (HTTP errors, timeouts,
  answers lost or reset after the marketplace took the records);
- ``billing_local.cli.run_hour`` takes the runtime factory and a drain (``Drain``): duplicate deliveries
  and PostgreSQL terminating connections (``ConnectionKiller``) beside it;
- the marketplaces' own subscription news (issue #13): ``Subscribers`` subscribes customers through each
  marketplace's event path into the Subscriptions function's handler code and cancels them the same way,
  and ``DuringBill`` (a ``Wrappers`` repository) makes a cancellation arrive in the middle of that
  customer's bill.

Each fault records the evidence that it happened the way its name says (``Gate.calls`` with the request
bytes, ``Deliveries.windows``, ``ConnectionKiller.killed`` with the statement that was running,
``Cancellation.in_flight`` with the customer's ledger rows of the hour being billed), so a test can prove
its fault fired.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from aiohttp import web

from billing.domain.model import LedgerState, Period

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Coroutine

    from billing_local.runner import Delivery, RunnerStats
    from billing_local.stack import LocalStack

    Handler = Callable[[Delivery], Awaitable[Any]]

# an HTTP status, "timeout" (nothing done, no answer), "lost" (done, answer lost) or "reset" (done, then the
# connection reset: RST while the client reads the answer)
Fault = int | str
KINDS: tuple[Fault, ...] = (429, 500, 503, "timeout", "lost", "reset")
RESET = f"[Errno {errno.ECONNRESET}]"  # how a RST reads in a recorded reason (a clean close has no errno)
ALL = ("aws", "gcp", "azure")


class Killed(Exception):
    """The process running this code died here (the runner, like Lambda, leaves the message for SQS)."""


@dataclass
class Clock:
    """The time the biller and the three emulators see."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now

    def billing(self, hour: Period) -> None:
        """The moment the scheduled run bills ``hour``: 20 minutes after it ended."""
        self.now = hour.end + timedelta(minutes=20)


# --- in front of the marketplace emulators ----------------------------------------------------------------


def marketplace_error(marketplace: str, status: int) -> web.Response:
    """An error answer of ``status`` in the marketplace's own format (AWS JSON 1.1, Google, Azure)."""
    if marketplace == "aws":
        code = {429: "ThrottlingException", 500: "InternalServiceErrorException"}.get(
            status, "ServiceUnavailableException"
        )
        return web.json_response(
            {"__type": code, "message": "injected"},
            status=status,
            headers={"x-amzn-ErrorType": code},
            content_type="application/x-amz-json-1.1",
        )
    if marketplace == "gcp":
        name = {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}.get(
            status, "DEADLINE_EXCEEDED"
        )
        return web.json_response(
            {"error": {"code": status, "message": "injected", "status": name}}, status=status
        )
    return web.json_response({"code": "ServerError", "message": "injected", "details": []}, status=status)


def reset_connection(request: web.Request) -> None:
    """Drop ``request``'s TCP connection with a reset (RST), not a clean close (FIN).

    SO_LINGER on with a zero timeout makes close() discard unsent data and send RST (socket(7)), as a
    crashed load balancer or a NAT that forgot the flow does; the client sees ECONNRESET while it reads
    the answer. Call it after the emulator did the work: the request was received and taken.
    """
    transport = request.transport
    if transport is None:  # already gone: nothing left to reset
        return
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def with_middleware(
    create_app: Callable[[Any], web.Application], middleware: Callable[[], Any]
) -> Callable[[Any], web.Application]:
    """An emulator's ``create_app`` whose application runs ``middleware()`` in front of its handlers."""

    def create(state: Any) -> web.Application:
        app = create_app(state)
        app.middlewares.append(middleware())
        return app

    return create


@dataclass(frozen=True)
class Call:
    """One request to a marketplace emulator, as a fault plan sees it, and what the gate did with it."""

    marketplace: str
    method: str  # "meter" (AWS BatchMeterUsage), "check" or "report" (Google), "batch" (Azure)
    customers: tuple[str, ...]
    body: bytes = b""
    fault: Fault | None = None


class Gate:
    """An aiohttp middleware in front of one emulator: the plan decides each call's fault.

    ``calls`` keeps every call with its request bytes and its fault: the evidence a case reads.
    """

    def __init__(self, marketplace: str, hang_s: float) -> None:
        self.marketplace = marketplace
        self.hang_s = hang_s  # how long a timeout or a lost answer sits on the request
        self.plan: Callable[[Call], Fault | None] | None = None
        self.identities: dict[tuple[str, str], str] = {}
        self.calls: list[Call] = []
        self.after_lost: Callable[[], None] | None = None  # runs once the lost answer's work is done

    @property
    def served(self) -> Counter[str]:
        return Counter(str(c.fault) for c in self.calls if c.fault is not None)

    def middleware(self) -> Any:
        @web.middleware
        async def gate(request: web.Request, handler: Any) -> web.StreamResponse:
            plan = self.plan
            if plan is None or _lifecycle(request.path):
                passed: web.StreamResponse = await handler(request)
                return passed
            body = await request.read()
            call = Call(self.marketplace, _method(request.path), self._customers(body), body)
            fault = plan(call)
            self.calls.append(dataclasses.replace(call, fault=fault))
            if fault is None:
                answer: web.StreamResponse = await handler(request)
                return answer
            if fault in ("lost", "reset"):
                response: web.StreamResponse = await handler(request)
                if self.after_lost is not None:
                    self.after_lost()
                if fault == "reset":
                    reset_connection(request)
                else:
                    await asyncio.sleep(self.hang_s)
                return response
            if fault == "timeout":
                await asyncio.sleep(self.hang_s)
                return marketplace_error(self.marketplace, 504)
            assert isinstance(fault, int)
            return marketplace_error(self.marketplace, fault)

        return gate

    def retried(self) -> list[Call]:
        """The faulted calls that the client called again afterwards (same method and customers)."""
        out = []
        for i, call in enumerate(self.calls):
            if call.fault is not None and any(
                (c.method, c.customers) == (call.method, call.customers) for c in self.calls[i + 1 :]
            ):
                out.append(call)
        return out

    def submissions(self, customer: str) -> list[Call]:
        """The customer's metering calls (not Google's checks), in order."""
        return [c for c in self.calls if c.method != "check" and customer in c.customers]

    def _customers(self, raw: bytes) -> tuple[str, ...]:
        try:
            body = json.loads(raw)
        except ValueError:
            return ()
        if self.marketplace == "aws":
            records = body.get("UsageRecords", [])
            keys = [r.get("CustomerIdentifier") or r.get("CustomerAWSAccountId") for r in records]
        elif self.marketplace == "gcp":
            operations = body.get("operations") or [body.get("operation", {})]
            keys = [o.get("consumerId") for o in operations]
        else:
            events = body.get("request", [])
            keys = [(e.get("resourceId") or "").lower() or e.get("resourceUri") for e in events]
        return tuple(sorted({self.identities.get((self.marketplace, str(k)), str(k)) for k in keys}))


def _lifecycle(path: str) -> bool:
    """A call of the subscription APIs (Procurement, SaaS fulfillment, their keys), not metering: the
    plans fault metering only."""
    return path.startswith(("/v1/providers/", "/api/saas/", "/oauth2/")) or "/discovery/" in path


def _method(path: str) -> str:
    if path.endswith(":check"):
        return "check"
    if path.endswith(":report"):
        return "report"
    return "batch" if "batchUsageEvent" in path else "meter"


def quantities(marketplace: str, body: bytes) -> dict[str, int]:
    """A metering request's quantity per dimension, read from its bytes as the marketplace reads them."""
    doc = json.loads(body)
    if marketplace == "aws":
        return {r["Dimension"]: int(r["Quantity"]) for r in doc["UsageRecords"]}
    if marketplace == "gcp":
        out = {}
        for operation in doc.get("operations") or [doc.get("operation", {})]:
            for metric in operation.get("metricValueSets", []):
                value = metric["metricValues"][0]
                out[metric["metricName"].rsplit("/", 1)[-1]] = int(value.get("int64Value", 0))
        return out
    return {e["dimension"]: int(e["quantity"]) for e in doc["request"]}


def always(fault: Fault, *methods: str) -> Callable[[Call], Fault | None]:
    """Every call (of these methods, if named) meets ``fault``."""
    return lambda call: fault if not methods or call.method in methods else None


def lost_once_then(fault: Fault) -> Callable[[Call], Fault | None]:
    """Each customer's first submission is taken and its answer lost; every later one meets ``fault``."""
    seen: set[tuple[str, ...]] = set()

    def plan(call: Call) -> Fault | None:
        if call.method == "check":
            return None
        if call.customers in seen:
            return fault
        seen.add(call.customers)
        return "lost"

    return plan


def in_bursts(
    fault: Fault, bursts: tuple[range, ...] = (range(0, 5), range(8, 14))
) -> Callable[[Call], Fault | None]:
    """The calls numbered in ``bursts`` (0-based, per marketplace) meet ``fault``; the others pass."""
    numbers = itertools.count()

    def plan(call: Call) -> Fault | None:
        n = next(numbers)
        return fault if any(n in burst for burst in bursts) else None

    return plan


@dataclass
class RandomFaults:
    """A plan for bench/chaos: a share ``rate`` of the calls meet a fault of any kind, and every call
    meets 503 while the marketplace is down (``down_until``, time.monotonic())."""

    rng: random.Random
    rate: float = 0.0
    down_until: float = 0.0
    chosen: Counter[str] = field(default_factory=Counter)  # "outage 503" or the fault, by kind

    def __call__(self, call: Call) -> Fault | None:
        if time.monotonic() < self.down_until:
            self.chosen["outage 503"] += 1
            return 503
        if not self.rate or self.rng.random() >= self.rate:
            return None
        fault = self.rng.choice(KINDS)
        self.chosen[str(fault)] += 1
        return fault


class ShortMarketplaceTimeouts:
    """An aioboto3 session whose AWS metering clients wait ``timeout_s`` for an answer, with the layer's
    newer meteringmarketplace model first on its data path, as the composition root's own session has it
    (without it botocore refuses a license customer's ``LicenseArn`` before sending)."""

    def __init__(self, session: Any, timeout_s: float) -> None:
        from billing.adapters.aws_metering import use_shipped_models

        self._session = use_shipped_models(session)
        self._timeout_s = timeout_s

    def client(self, service: str, config: Any = None, **kwargs: Any) -> Any:
        from botocore.config import Config

        if service == "meteringmarketplace":
            short = Config(connect_timeout=self._timeout_s, read_timeout=self._timeout_s)
            config = (config or Config()).merge(short)
        return self._session.client(service, config=config, **kwargs)


# --- around the composition root's adapters ---------------------------------------------------------------


class Proxy:
    """Delegates everything to ``inner``; subclasses override what they fault."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


AFTER_DECISION = "after the decision"
AFTER_ACCEPT = "after the marketplace accepted"
AFTER_ANSWER = "after the marketplace answered"


class KillingLedger(Proxy):
    """A BillingRepository whose writer dies right after its decision was recorded, or after the
    marketplace accepted the records and before the ledger recorded that answer, where ``kills(step,
    customer)`` says so. ``killed`` lists (step, customer) of every death; ``on_kill(customer)`` runs
    just before it (what changes in the world while the process is dead)."""

    def __init__(
        self,
        inner: Any,
        kills: Callable[[str, str], bool],
        on_kill: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(inner)
        self.kills = kills
        self.on_kill = on_kill
        self.killed: list[tuple[str, str]] = []

    async def _die(self, step: str, customer: str) -> None:
        self.killed.append((step, customer))
        if self.on_kill is not None:
            await self.on_kill(customer)
        raise Killed(step)

    async def record_decision(self, state: Any, *args: Any, **kwargs: Any) -> bool:
        decided: bool = await self.inner.record_decision(state, *args, **kwargs)
        if self.kills(AFTER_DECISION, state.customer.id):
            await self._die(AFTER_DECISION, state.customer.id)
        return decided

    async def record_results(self, customer_id: str, *args: Any, **kwargs: Any) -> None:
        if self.kills(AFTER_ACCEPT, customer_id):
            await self._die(AFTER_ACCEPT, customer_id)
        await self.inner.record_results(customer_id, *args, **kwargs)


class DuringBill(Proxy):
    """A BillingRepository that runs ``during(step, customer, period)`` in the middle of a customer's bill
    where ``when(step, customer, period)`` says so: right after the bill's decision was recorded (nothing
    sent yet: AFTER_DECISION), or after the marketplace answered (whatever the answer) and before the ledger
    recorded it (AFTER_ANSWER). The world changing while the bill is in flight: a cancellation arriving
    (``Subscribers.cancel``). ``fired`` lists (step, customer, period) of each time it ran."""

    def __init__(
        self,
        inner: Any,
        when: Callable[[str, str, Period], bool],
        during: Callable[[str, str, Period], Awaitable[None]],
    ) -> None:
        super().__init__(inner)
        self.when = when
        self.during = during
        self.fired: list[tuple[str, str, Period]] = []

    async def _maybe(self, step: str, customer: str, period: Period) -> None:
        if self.when(step, customer, period):
            self.fired.append((step, customer, period))
            await self.during(step, customer, period)

    async def record_decision(self, state: Any, message: Any, *args: Any, **kwargs: Any) -> bool:
        decided: bool = await self.inner.record_decision(state, message, *args, **kwargs)
        if decided:
            await self._maybe(AFTER_DECISION, state.customer.id, message.billing_period)
        return decided

    async def record_results(self, customer_id: str, period: Period, *args: Any, **kwargs: Any) -> None:
        await self._maybe(AFTER_ANSWER, customer_id, period)
        await self.inner.record_results(customer_id, period, *args, **kwargs)


class FaultyUsage(Proxy):
    """A UsageSource whose searches time out (TransientError) or answer ``slow_s`` late, where
    ``fault(customer)`` returns "timeout" or "slow". ``calls`` counts the searches, ``faults`` the faults."""

    def __init__(self, inner: Any, fault: Callable[[str], str | None], slow_s: float = 0.2) -> None:
        super().__init__(inner)
        self.fault = fault
        self.slow_s = slow_s
        self.calls: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.slow: list[float] = []  # how long each slow search took, seconds

    async def hourly_usage(self, customer_id: str, start: datetime, end: datetime) -> Any:
        from billing.domain.errors import TransientError

        self.calls[customer_id] += 1
        fault = self.fault(customer_id)
        if fault is not None:
            self.faults[fault] += 1
        if fault == "timeout":
            raise TransientError("usage search timed out")
        began = time.monotonic()
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        usage = await self.inner.hourly_usage(customer_id, start, end)
        if fault == "slow":
            self.slow.append(time.monotonic() - began)
        return usage


class DyingQueue(Proxy):
    """A MessageQueue whose dispatcher dies once ``after`` messages were sent (a page is sent lane by
    lane, one call per marketplace in it); ``sent`` holds each call's count before that."""

    def __init__(self, inner: Any, after: int) -> None:
        super().__init__(inner)
        self.after = after
        self.sent: list[int] = []
        self.died = False

    async def send(self, messages: Any, lane: Any = None, delay_seconds: int = 0) -> int:
        if sum(self.sent) >= self.after:
            self.died = True
            raise Killed("dispatcher killed half way")
        sent: int = await self.inner.send(messages, lane=lane, delay_seconds=delay_seconds)
        self.sent.append(sent)
        return sent


# --- around the runner's drain ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """One delivery's time in the handler (time.monotonic()) and how it ended."""

    body: str
    message_id: str
    receive_count: int
    began: float
    ended: float
    outcome: str


@dataclass
class Deliveries:
    """Duplicates deliveries where ``twice(body)`` says "sequence" (once more after the first finished) or
    "at once" (two at the same moment), and keeps every delivery's ``Window``."""

    twice: Callable[[str], str | None] = lambda body: None
    windows: list[Window] = field(default_factory=list)
    duplicated: dict[str, str] = field(default_factory=dict)  # body -> how

    def wrap(self, handle: Handler, sqs: Any, queue_url: str) -> Handler:
        recorded = self._recorded(handle)

        async def deliver(delivery: Delivery) -> Any:
            how = None if delivery.body in self.duplicated else self.twice(delivery.body)
            if how is None:
                return await recorded(delivery)
            self.duplicated[delivery.body] = how
            if how == "sequence":
                outcome = await recorded(delivery)
                await sqs.send_message(QueueUrl=queue_url, MessageBody=delivery.body)
                return outcome
            twin = dataclasses.replace(delivery, message_id=f"{delivery.message_id}-twin")
            first, second = await asyncio.gather(recorded(delivery), recorded(twin), return_exceptions=True)
            if isinstance(second, Exception):  # SQS would deliver the twin again
                await sqs.send_message(QueueUrl=queue_url, MessageBody=delivery.body)
            if isinstance(first, BaseException):
                raise first
            return first

        return deliver

    def _recorded(self, handle: Handler) -> Handler:
        async def deliver(delivery: Delivery) -> Any:
            began = time.monotonic()
            try:
                outcome = await handle(delivery)
            except BaseException as exc:
                self._record(delivery, began, type(exc).__name__)
                raise
            self._record(delivery, began, "ok")
            return outcome

        return deliver

    def _record(self, delivery: Delivery, began: float, outcome: str) -> None:
        ended = time.monotonic()
        self.windows.append(
            Window(delivery.body, delivery.message_id, delivery.receive_count, began, ended, outcome)
        )

    def of(self, body: str) -> list[Window]:
        return sorted((w for w in self.windows if w.body == body), key=lambda w: w.began)

    def overlapping(self) -> list[str]:
        """Bodies delivered "at once" whose first two deliveries were in the handler at the same time."""
        out = []
        for body, how in self.duplicated.items():
            windows = self.of(body)
            if how == "at once" and len(windows) >= 2 and windows[1].began < windows[0].ended:
                out.append(body)
        return out

    def sequential(self) -> list[str]:
        """Bodies delivered "in sequence" whose second delivery began after the first had ended."""
        out = []
        for body, how in self.duplicated.items():
            windows = self.of(body)
            if how == "sequence" and len(windows) >= 2 and windows[1].began >= windows[0].ended:
                out.append(body)
        return out


@dataclass(frozen=True)
class Termination:
    pid: int
    state: str  # pg_stat_activity.state when it was terminated
    query: str  # the statement it was running (or had run last)
    waiting: str | None  # wait_event_type: "Lock" while blocked behind a lock held by the killer
    died: bool | None = None  # gone from pg_stat_activity while its statement could not have finished


class ConnectionKiller:
    """PostgreSQL terminating billing connections (application_name), each recorded with the state and
    statement pg_stat_activity showed for it when it was terminated."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.killed: list[Termination] = []

    async def terminate(self, admin: Any, *, limit: int | None = None, waiting_on_lock: bool = False) -> int:
        rows = await admin.fetch(
            "SELECT pid, state, query, wait_event_type, pg_terminate_backend(pid) AS done FROM ("
            "  SELECT pid, state, query, wait_event_type FROM pg_stat_activity"
            "   WHERE datname = current_database() AND application_name = 'marketplace-billing'"
            "     AND pid <> pg_backend_pid() AND state = 'active'"
            "     AND ($2 IS FALSE OR wait_event_type = 'Lock')"
            "   ORDER BY pid LIMIT $1) AS busy",
            limit,
            waiting_on_lock,
        )
        done = [
            Termination(r["pid"], r["state"], r["query"], r["wait_event_type"]) for r in rows if r["done"]
        ]
        self.killed += done
        return len(done)

    @contextlib.asynccontextmanager
    async def every(self, seconds: float, on: Callable[[], bool] = lambda: True) -> AsyncIterator[None]:
        """Every ``seconds``, terminate every billing connection busy with a statement (bench/chaos).

        A tick that finds none busy looks again every 5 ms until it terminates one or the next tick is
        due: a bill spends a few milliseconds in SQL, so a single look at a random instant mostly found
        none, and a small run could end with no connection terminated at all."""

        async def loop(admin: Any, locker: Any) -> None:
            clock = asyncio.get_running_loop()
            while True:
                await asyncio.sleep(seconds)
                tick = clock.time()
                # polled: PostgreSQL tells no one when a statement starts
                while on() and not await self.terminate(admin) and clock.time() - tick < seconds:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)

        async with self._beside(loop):
            yield

    @contextlib.asynccontextmanager
    async def mid_statement(self, table: str, budget: int) -> AsyncIterator[None]:
        """Terminate ``budget`` billing connections, one at a time, each in the middle of a statement: the
        killer locks ``table`` (ACCESS EXCLUSIVE), waits until a billing statement is blocked on it (running,
        'active' in pg_stat_activity), terminates that connection, then lets the others through."""

        async def loop(admin: Any, locker: Any) -> None:
            while len(self.killed) < budget:
                async with locker.transaction():
                    await locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                    # polled: PostgreSQL tells no one when a statement starts waiting on a lock
                    while not await self.terminate(admin, limit=1, waiting_on_lock=True):  # noqa: ASYNC110
                        await asyncio.sleep(0.005)
                    # still holding the lock, so its statement cannot have finished: gone means killed
                    victim = self.killed[-1]
                    self.killed[-1] = dataclasses.replace(victim, died=await _gone(admin, victim.pid))

        async with self._beside(loop):
            yield

    @contextlib.asynccontextmanager
    async def _beside(self, loop: Callable[[Any, Any], Coroutine[Any, Any, None]]) -> AsyncIterator[None]:
        """``loop(admin, locker)`` runs on two connections of its own for the block, then is cancelled."""
        import asyncpg

        admin = await asyncpg.connect(self.dsn)
        locker = await asyncpg.connect(self.dsn)
        task = asyncio.create_task(loop(admin, locker))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await locker.close()
            await admin.close()


async def _gone(admin: Any, pid: int, within_s: float = 10.0) -> bool:
    """Whether backend ``pid`` leaves pg_stat_activity within ``within_s`` (termination is asynchronous)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            return True
        await asyncio.sleep(0.01)
    return False


class ShortPolls(Proxy):
    """The runner's SQS client with short polls (a tenth of a second apart when the queue is empty): a
    drain ends up to a second sooner than after its last long poll."""

    async def receive_message(self, **kwargs: Any) -> Any:
        response = await self.inner.receive_message(**{**kwargs, "WaitTimeSeconds": 0})
        if not response.get("Messages"):
            await asyncio.sleep(0.1)
        return response


@dataclass
class Drain:
    """The runner's drain with the faults around it: ``run_hour(..., drain=Drain(...))``."""

    deliveries: Deliveries | None = None
    beside: Callable[[], contextlib.AbstractAsyncContextManager[Any]] | None = None
    short_polls: bool = False

    async def __call__(
        self, sqs: Any, queue_url: str, handle: Handler, concurrency: int, *args: Any, **kwargs: Any
    ) -> RunnerStats:
        from billing_local.runner import drain

        if self.deliveries is not None:
            handle = self.deliveries.wrap(handle, sqs, queue_url)
        beside = self.beside() if self.beside is not None else contextlib.nullcontext()
        async with beside:
            client = ShortPolls(sqs) if self.short_polls else sqs
            return await drain(client, queue_url, handle, concurrency, *args, **kwargs)


# --- what a run leaves -----------------------------------------------------------------------------------


HourKey = tuple[str, str, datetime]  # (customer, dimension, hour)


def held_records(stack: LocalStack, identities: dict[tuple[str, str], str]) -> dict[HourKey, list[int]]:
    """Every record the three emulators hold: (customer, dimension, hour) -> the quantities held."""
    from billing.domain.model import hour_floor

    held: dict[HourKey, list[int]] = {}

    def hold(marketplace: str, key: str, dimension: str, hour: datetime, quantity: int) -> None:
        held.setdefault((identities[marketplace, key], dimension, hour_floor(hour)), []).append(quantity)

    for r in stack.metering.accepted():
        hold("aws", r.customer, r.dimension, r.timestamp, r.quantity)
    for g in list(stack.gcp.records.values()):
        hold("gcp", g.consumer_id, g.metric, g.start_time, g.value)
    for (resource, dimension, hour), event in list(stack.azure.accepted.items()):
        hold("azure", resource, dimension, hour, int(event.quantity))
    return held


async def identities(dsn: str) -> dict[tuple[str, str], str]:
    """(marketplace, the marketplace's key for the customer) -> customer id."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT * FROM customers")
    finally:
        await conn.close()
    out = {}
    for r in rows:
        key = {
            "aws": r["aws_customer_identifier"] or r["aws_account_id"],
            "gcp": r["gcp_usage_reporting_id"],
            "azure": (r["azure_resource_id"] or "").lower() or r["azure_resource_uri"],
        }[r["marketplace"]]
        out[r["marketplace"], key] = r["id"]
    return out


def redrive(stack: LocalStack) -> Any:
    """`billing redrive`'s own code: the dead-letter queue back into the billing queue."""
    import boto3
    from botocore.config import Config

    from billing_local.cli_ops import redrive as redrive_queue
    from billing_local.cli_ops import resolve_queue

    sqs = boto3.client("sqs")
    probe = boto3.client("sqs", config=Config(retries={"mode": "standard", "total_max_attempts": 1}))
    dlq = resolve_queue(sqs, stack.dlq_url, None, "dead-letter queue")
    queue = resolve_queue(sqs, stack.queue_url, None, "billing queue")
    quiet = lambda label, total: contextlib.nullcontext(lambda n: None)  # noqa: E731
    return redrive_queue(sqs, dlq, queue, probe=probe, wait_seconds=0, progress=quiet)


def dead_letters(stack: LocalStack) -> list[str]:
    """The bodies in the dead-letter queue, left there and visible again."""
    import boto3

    sqs = boto3.client("sqs")
    bodies: dict[str, str] = {}
    handles = []
    while got := sqs.receive_message(
        QueueUrl=stack.dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=60
    ).get("Messages", []):
        bodies |= {m["MessageId"]: m["Body"] for m in got}
        handles += [m["ReceiptHandle"] for m in got]
    for start in range(0, len(handles), 10):
        entries = [
            {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": 0}
            for i, h in enumerate(handles[start : start + 10])
        ]
        sqs.change_message_visibility_batch(QueueUrl=stack.dlq_url, Entries=entries)
    return sorted(bodies.values())


# --- subscriptions: customers the marketplaces subscribe and cancel (#13) --------------------------------

FINAL_STATES = frozenset(state.value for state in LedgerState if state.final)


@dataclass(frozen=True)
class Subject:
    """A customer that came from a marketplace's own events, and the marketplace's ids for it."""

    marketplace: str
    tenant: str  # the customer id: what usage is recorded against
    subject_id: str  # AWS license id (l-...), Google entitlement id, Azure SaaS subscription id
    account: str = ""  # AWS: CustomerAWSAccountId; Google: the billing account
    agreement: str = ""  # AWS: the agreement id
    license_arn: str = ""  # AWS


@dataclass(frozen=True)
class Cancellation:
    """One cancellation delivered: when, how the handler answered, and what the customer's bill of the
    hour in flight looked like around it (``in_flight``: (dimension, ledger state) read just before the
    event was handed over, ``after``: just after it was recorded; empty outside a bill)."""

    subject: Subject
    at: datetime
    answers: tuple[Any, ...]
    step: str | None = None  # DuringBill's step, None when delivered outside a bill
    hour: Period | None = None
    in_flight: tuple[tuple[str, str], ...] = ()
    after: tuple[tuple[str, str], ...] = ()
    status: str = ""  # subscription_state.status once recorded
    ends_at: datetime | None = None
    failed_deliveries: tuple[str, ...] = ()  # deliveries the handler did not take (delivered again)

    @property
    def during_bill(self) -> bool:
        """Delivered and recorded while the hour's bill was decided and not finished."""
        return (
            bool(self.in_flight)
            and any(state not in FINAL_STATES for _, state in self.in_flight)
            and any(state not in FINAL_STATES for _, state in self.after)
        )


class Subscribers:
    """Customers that come from the marketplaces: subscribed through each marketplace's own events, handed
    to the Subscriptions function's handler code (``billing.entrypoints.subscriptions.handle``), and
    cancelled the same way: AWS's ``License Updated`` / ``License Deprovisioned - Manufacturer`` EventBridge
    events, Google's Procurement notifications by Pub/Sub push (OIDC-signed; the handler reads the
    entitlement back and approves it), Azure's landing page (resolve + activate) and ``Unsubscribe`` webhook
    (Entra-signed; the handler reads the operation back). Needs ``local_stack(lifecycle=True)``.

    ``clock`` is the functions' and the marketplaces' time: a cancellation ends the subscription at
    ``clock()``, and the handler sends the final bills for its hours up to that instant.
    """

    def __init__(self, stack: LocalStack, clock: Callable[[], datetime], deliveries: int = 5) -> None:
        self.stack = stack
        self.clock = clock
        self.deliveries = deliveries  # how often an event is delivered before the marketplace gives up
        gcp, azure = stack.gcp, stack.azure
        if gcp.procurement is None or azure.fulfillment is None:
            raise ValueError("Subscribers needs local_stack(lifecycle=True)")
        gcp.procurement.clock = clock
        azure.fulfillment.clock = clock
        self.subjects: dict[str, Subject] = {}
        self.cancellations: list[Cancellation] = []
        self._pushed = 0  # Procurement notifications delivered so far

    async def subscribe(self, marketplace: str, name: str) -> Subject:
        """A new customer of ``marketplace`` (``name`` makes its ids), active from ``clock()``."""
        from billing_local.emulators.aws_events import agreement_event
        from billing_local.emulators.azure import AzureResource
        from billing_local.emulators.azure_fulfillment import landing_page_event
        from billing_local.seed import AWS_PRODUCT_CODE, GCP_SERVICE_NAME, RATE_CARD

        now = self.clock()
        dimensions = {d for m, _metric, d, _factor in RATE_CARD if m == marketplace}
        if marketplace == "aws":
            # one AWS account per subject, the same in every run (the fault suite compares two worlds)
            digest = hashlib.sha256(name.encode()).hexdigest()
            account = f"9{int(digest, 16) % 10**11:011d}"
            arn = f"arn:aws:license-manager::794222239362:license:l-{digest[:32]}"
            agreement = f"agmt-{name}"
            self.stack.metering.add_product(AWS_PRODUCT_CODE, dimensions)
            self.stack.metering.add_license(AWS_PRODUCT_CODE, account, arn, agreement)
            event = agreement_event(
                "License Updated - Manufacturer",
                agreement_id=agreement,
                account_id=account,
                at=now,
                license_arn=arn,
                product_code=AWS_PRODUCT_CODE,
            )
            answers = await self._deliver([event])
            subject = Subject("aws", "", f"l-{digest[:32]}", account, agreement, arn)
        elif marketplace == "gcp":
            procurement = self.stack.gcp.procurement
            assert procurement is not None
            self.stack.gcp.services.setdefault(GCP_SERVICE_NAME, dimensions)  # type: ignore[attr-defined]
            procurement.sign_up(f"acct-{name}")
            procurement.purchase(f"ent-{name}", f"acct-{name}", GCP_SERVICE_NAME, "standard")
            answers = await self._push()
            subject = Subject("gcp", "", f"ent-{name}", f"acct-{name}")
        else:
            fulfillment = self.stack.azure.fulfillment
            assert fulfillment is not None
            token = fulfillment.purchase("offer-billing", "standard", quantity=1)
            subscription = fulfillment.purchase_tokens[token]
            self.stack.azure.resources[subscription] = AzureResource(  # type: ignore[index]
                plan_id="standard", dimensions=sorted(dimensions), status="Pending"
            )
            answers = await self._deliver([landing_page_event(token, f"azure-{name}")])
            subject = Subject("azure", "", subscription)
        tenant = await self._tenant(subject)
        if tenant is None:
            raise RuntimeError(f"{marketplace} subject {subject.subject_id} was not linked: {answers}")
        subject = dataclasses.replace(subject, tenant=tenant)
        self.subjects[tenant] = subject
        return subject

    async def cancel(
        self, tenant: str, *, step: str | None = None, hour: Period | None = None
    ) -> Cancellation:
        """The customer cancels at ``clock()``: the marketplace's own cancellation event, handed to the
        handler. Inside a bill (``step``, ``hour``: DuringBill's), the evidence is the customer's ledger rows
        of ``hour`` just before and just after."""
        from billing_local.emulators.aws_events import agreement_event
        from billing_local.seed import AWS_PRODUCT_CODE

        subject = self.subjects[tenant]
        now = self.clock()
        in_flight = await self._rows(tenant, hour) if hour is not None else ()
        deliver: Callable[[], Awaitable[list[Any]]]
        if subject.marketplace == "aws":
            self.stack.metering.deprovision(subject.license_arn, now)
            event = agreement_event(
                "License Deprovisioned - Manufacturer",
                agreement_id=subject.agreement,
                account_id=subject.account,
                at=now,
                license_arn=subject.license_arn,
                product_code=AWS_PRODUCT_CODE,
            )
            deliver = lambda: self._deliver([event])  # noqa: E731
        elif subject.marketplace == "gcp":
            procurement = self.stack.gcp.procurement
            assert procurement is not None
            procurement.cancel(subject.subject_id)
            deliver = self._push
        else:
            fulfillment, signer = self.stack.azure.fulfillment, self.stack.azure.webhook_signer
            assert fulfillment is not None and signer is not None
            payload = fulfillment.notify(subject.subject_id, "Unsubscribe")
            deliver = lambda: self._deliver([signer.http_api_event(payload)])  # noqa: E731
        # EventBridge, Pub/Sub push and Azure's webhook all deliver again an event that was not taken (a
        # database connection terminated under the handler, in bench/chaos); replays change nothing
        failures: list[str] = []
        while True:
            try:
                answers = await deliver()
                break
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                if len(failures) >= self.deliveries:
                    raise
        after = await self._rows(tenant, hour) if hour is not None else ()
        state = await _fetch_one(
            self.stack.database_url,
            "SELECT status, ends_at FROM subscription_state WHERE customer_id = $1",
            tenant,
        )
        cancellation = Cancellation(
            subject,
            now,
            tuple(answers),
            step,
            hour,
            in_flight,
            after,
            state["status"] if state else "",
            state["ends_at"] if state else None,
            tuple(failures),
        )
        self.cancellations.append(cancellation)
        return cancellation

    async def _push(self) -> list[Any]:
        """Every Procurement notification published since the last push, as Pub/Sub push delivers them
        (an approval by the handler publishes the next one)."""
        procurement, signer = self.stack.gcp.procurement, self.stack.gcp.push_signer
        assert procurement is not None and signer is not None
        answers = []
        while self._pushed < len(procurement.published):
            answers += await self._deliver([signer.http_api_event(procurement.published[self._pushed])])
            self._pushed += 1
        return answers

    async def _deliver(self, events: list[dict[str, Any]]) -> list[Any]:
        """Each event handed to the Subscriptions function's handler, as its triggers do; one that is not
        taken (a 4xx/5xx answer) is an error here: the fault is the cancellation, not a refused one."""
        from billing.bootstrap import Runtime
        from billing.config import load_settings
        from billing.entrypoints.subscriptions import Subscriptions, handle

        runtime = Runtime(load_settings(), clock=self.clock)
        subs = Subscriptions(runtime)
        answers = []
        try:
            for event in events:
                answer = await handle(subs, event)
                if answer.get("statusCode", 200) >= 300:
                    raise RuntimeError(f"the Subscriptions handler refused an event: {answer}")
                answers.append(answer)
        finally:
            await subs.close()
            await runtime.close()
        return answers

    async def _tenant(self, subject: Subject) -> str | None:
        row = await _fetch_one(
            self.stack.database_url,
            "SELECT customer_id FROM subscription_state WHERE marketplace = $1 AND subject_id = $2",
            subject.marketplace,
            subject.subject_id,
        )
        return row["customer_id"] if row else None

    async def _rows(self, tenant: str, hour: Period) -> tuple[tuple[str, str], ...]:
        import asyncpg

        conn = await asyncpg.connect(self.stack.database_url)
        try:
            rows = await conn.fetch(
                "SELECT dimension, state FROM ledger WHERE customer_id = $1 AND period = $2 ORDER BY 1",
                tenant,
                hour.start,
            )
        finally:
            await conn.close()
        return tuple((r["dimension"], r["state"]) for r in rows)


async def _fetch_one(dsn: str, query: str, *args: Any) -> Any:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow(query, *args)
    finally:
        await conn.close()

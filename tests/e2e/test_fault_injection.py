"""Fault injection: whatever fails, the marketplaces end up holding what a run without faults gives them.

Every case bills on a fresh database and local stack (embedded PostgreSQL, moto's SQS, the emulators of
the three marketplaces) through the local runner, ``billing_local.local_run.run_hour``, with its faults
injected through parameters (billing_local.faults, shared with bench/chaos), never by patching a module:

- in front of each marketplace emulator (``local_stack(middlewares=...)``), a ``Gate`` answers the calls
  a plan picks with an HTTP status, with no answer at all (a timeout), or does the work and then never
  answers (the marketplace took the records and the answer was lost) or resets the connection (RST)
  while the client reads the answer;
- in the composition root (``Runtime(clock=..., aws_session=..., wrappers=...)``): a virtual clock shared
  with the emulators, a usage source that times out or is slow, a ledger whose writer is killed at a
  chosen step, a dispatcher's queue that dies half way (the lease comes from the settings);
- around the runner's drain (``run_hour(drain=...)``): deliveries of one message twice, in sequence or at
  the same moment; PostgreSQL terminating billing connections in the middle of a statement; poison
  messages in the queue.

Each case first proves its fault happened the way its name says, from what the injection recorded; then
``Lab.prove`` compares what the marketplaces hold, customer by customer and dimension by dimension, with a
clean run of the same data, and checks that they hold at most one record per customer, dimension and
hour, that the ledger records exactly what they hold, and that no ledger row is left unsettled.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aioboto3
import asyncpg
import boto3
import pytest
from botocore.retries.standard import ExponentialBackoff

from billing.bootstrap import Runtime, Wrappers
from billing.config import Settings, load_settings
from billing.domain.model import LedgerState, Period, hour_floor
from billing_local.faults import (
    AFTER_ACCEPT,
    AFTER_ANSWER,
    AFTER_DECISION,
    RESET,
    Call,
    Cancellation,
    Clock,
    ConnectionKiller,
    Deliveries,
    Drain,
    DuringBill,
    DyingQueue,
    Fault,
    FaultyUsage,
    Gate,
    Killed,
    KillingLedger,
    ShortMarketplaceTimeouts,
    Subscribers,
    always,
    dead_letters,
    held_records,
    identities,
    in_bursts,
    lost_once_then,
    quantities,
    redrive,
)
from billing_local.lambda_shapes import LambdaContext, sqs_record
from billing_local.local_run import HourResult, run_hour
from billing_local.local_run import seed_database as _seed
from billing_local.local_run import subscribe_all as _subscribe_all
from billing_local.stack import LocalStack, QueueSettings, environment, local_stack

pytestmark = pytest.mark.e2e

ALL = ("aws", "gcp", "azure")
PER_MARKETPLACE = 8  # customers of each marketplace in a world
SEED = 23
CONCURRENCY = 8
# An hour that ended two days ago (so the dispatcher accepts it); the clocks that matter are virtual.
H = Period(hour_floor(datetime.now(UTC)) - timedelta(hours=48))
NEXT = H.shifted(1)
WINDOWS = {"aws": timedelta(hours=6), "gcp": timedelta(hours=2), "azure": timedelta(hours=24)}
TIMEOUT_S = 0.5  # how long the marketplace clients wait for an answer here
HANG_S = TIMEOUT_S + 0.5  # how long a faulty emulator sits on a request
QUOTA = 50  # calls a second per account, project and publisher, in every emulator

TEST_ENV = {
    "POWERTOOLS_LOG_LEVEL": "ERROR",
    "POWERTOOLS_METRICS_DISABLED": "true",
    "BILLING_MARKETPLACE_ATTEMPTS": "2",
    "BILLING_GCP_TIMEOUT_SECONDS": str(TIMEOUT_S),
    "BILLING_AZURE_TIMEOUT_SECONDS": str(TIMEOUT_S),
    "BILLING_DISPATCH_PAGE_SIZE": "10",
    # Quotas on: every marketplace emulator refuses past QUOTA calls a second (rolling window), and the
    # biller paces each lane under it (one process: one environment per lane)
    **{f"BILLING_{m.upper()}_QUOTA_PER_SECOND": str(QUOTA) for m in ("aws", "gcp", "azure")},
    # The outage scenarios below need a throttled bill to fail its item (and reach the DLQ), as an
    # outage does: with requeueing on, a throttle that never lifts would requeue for ever. Requeueing
    # is proved in tests/integration/test_biller_aws.py and `make bench` (section lanes). A throttled
    # bill retries for 1 s (the budget less billing.budget's 5 s reserve), not 40.
    "BILLING_REQUEUE_THROTTLED": "false",
    "BILLING_INVOCATION_BUDGET_SECONDS": "6",
}

Key = tuple[str, str]  # (customer, dimension)
HourKey = tuple[str, str, datetime]  # (customer, dimension, hour)


# --- what the marketplaces hold -------------------------------------------------------------------------


@dataclass(frozen=True)
class Holdings:
    """Every record the three marketplaces hold, by customer, dimension and hour."""

    records: Counter[HourKey]  # how many records
    quantities: dict[HourKey, int]  # their total quantity

    def totals(self) -> dict[Key, int]:
        out: Counter[Key] = Counter()
        for (customer, dimension, _), quantity in self.quantities.items():
            out[customer, dimension] += quantity
        return dict(out)

    def duplicates(self) -> dict[HourKey, int]:
        return {k: n for k, n in self.records.items() if n > 1}

    def in_hour(self, hour: Period) -> dict[Key, int]:
        return {(c, d): q for (c, d, h), q in self.quantities.items() if h == hour.start}


def holdings(stack: LocalStack, ids: dict[tuple[str, str], str]) -> Holdings:
    held = held_records(stack, ids)
    return Holdings(Counter({k: len(q) for k, q in held.items()}), {k: sum(q) for k, q in held.items()})


# --- a world: one fresh database and local stack --------------------------------------------------------


@dataclass
class World:
    """One fresh stack, and what a scenario injects: ``wrappers`` and ``lease_seconds`` go into the
    composition root each run builds, ``drain`` around the runner's drain."""

    stack: LocalStack
    dsn: str
    clock: Clock
    gates: dict[str, Gate]
    identities: dict[tuple[str, str], str]
    subscribers: Subscribers | None = None  # with customers that came from the marketplaces' events
    wrappers: Wrappers = field(default_factory=Wrappers)
    lease_seconds: int | None = None
    drain: Drain = field(default_factory=lambda: Drain(short_polls=True))
    results: list[HourResult] = field(default_factory=list)

    def runtime(self, settings: Settings) -> Runtime:
        """The composition root with this world's clock, short marketplace timeouts and faults."""
        if self.lease_seconds is not None:
            settings = settings.model_copy(update={"lease_seconds": self.lease_seconds})
        return Runtime(
            settings,
            clock=self.clock,
            aws_session=ShortMarketplaceTimeouts(aioboto3.Session(), TIMEOUT_S),
            wrappers=self.wrappers,
        )

    def bill(self, hour: Period, *, at: datetime | None = None, retry_delay_s: int = 0) -> HourResult:
        """The scheduled run for ``hour`` (dispatch, drain), at ``at`` or 20 minutes after the hour."""
        if at is None:
            self.clock.billing(hour)
        else:
            self.clock.now = at
        result = asyncio.run(
            run_hour(
                {"period": hour.isoformat()},
                CONCURRENCY,
                retry_delay_s=retry_delay_s,
                runtime=self.runtime,
                drain=self.drain,
                quiet=True,
            )
        )
        self.results.append(result)
        return result

    def customers(self) -> list[str]:
        return sorted(set(self.identities.values()))

    def sql(self, query: str, *args: Any) -> list[dict[str, Any]]:
        return asyncio.run(_fetch(self.dsn, query, *args))

    def states(self, hour: Period) -> set[str]:
        """The states of the hour's ledger rows."""
        return {r["state"] for r in self.sql("SELECT state FROM ledger WHERE period = $1", hour.start)}

    def ledger(self) -> list[dict[str, Any]]:
        return self.sql("SELECT customer_id, dimension, period, quantity, state, last_error FROM ledger")

    def redrive(self) -> int:
        """`billing redrive`'s own code: the dead-letter queue back into the billing queue."""
        result = redrive(self.stack)
        assert result.ok, result
        return int(result.moved)

    def dead_letters(self) -> list[str]:
        """The bodies in the dead-letter queue (left there, visible)."""
        return dead_letters(self.stack)

    def send(self, *bodies: str) -> None:
        sqs = boto3.client("sqs")
        for body in bodies:
            sqs.send_message(QueueUrl=self.stack.queue_url, MessageBody=body)

    def body(self, customer: str, hour: Period = H) -> str:
        return json.dumps(
            {"version": 1, "customer_id": customer, "period": hour.isoformat(), "run_id": str(uuid.uuid4())}
        )


@dataclass
class Proof:
    held: Holdings
    clean: Holdings
    ledger: list[dict[str, Any]]
    dead_letters: list[str]
    results: list[HourResult]

    def differences(self) -> dict[Key, tuple[int, int]]:
        """(customer, dimension) -> (held now, held after the clean run), where they differ."""
        held, clean = self.held.totals(), self.clean.totals()
        return {
            k: (held.get(k, 0), clean.get(k, 0))
            for k in held.keys() | clean.keys()
            if held.get(k, 0) != clean.get(k, 0)
        }

    def ledger_disagreements(self) -> list[str]:
        """Where the ledger and the marketplaces disagree on a record."""
        rows = {(r["customer_id"], r["dimension"], r["period"]): r for r in self.ledger}
        problems = []
        for key, quantity in self.held.quantities.items():
            row = rows.get(key)
            if row is None or row["quantity"] != quantity:
                problems.append(f"{key}: held {quantity}, ledger {row and (row['state'], row['quantity'])}")
            elif row["state"] not in ("accepted", "duplicate", "rejected"):
                # rejected: an unconfirmed submission past the window, left for an operator
                problems.append(f"{key}: held {quantity}, ledger says {row['state']}")
        for key, row in rows.items():
            if row["state"] in ("accepted", "duplicate") and key not in self.held.quantities:
                problems.append(f"{key}: ledger says {row['state']} {row['quantity']}, not held")
        return problems

    def unsettled(self) -> list[tuple[str, str, str]]:
        finals = {s.value for s in LedgerState if s.final}
        return [
            (r["customer_id"], r["dimension"], r["state"]) for r in self.ledger if r["state"] not in finals
        ]

    @property
    def invocations(self) -> int:
        return sum(r.stats.invocations for r in self.results)

    @property
    def failures(self) -> int:
        return sum(r.stats.failed for r in self.results)


_CLEAN: dict[tuple[tuple[str, ...], tuple[Period, ...]], Holdings] = {}


@pytest.fixture(autouse=True)
def _no_botocore_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's own retries wait too (stamina's are off in tests: tests/conftest.py)."""
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)


@dataclass
class Lab:
    server: str
    template: str

    @contextlib.contextmanager
    def world(self, marketplaces: tuple[str, ...], subscribed: tuple[str, ...] = ()) -> Iterator[World]:
        """A fresh database seeded with the same data every time, a fresh stack, the gates in place; and a
        customer of each marketplace in ``subscribed`` that came from the marketplace's own events."""
        with self._database() as dsn:
            clock = Clock(H.end + timedelta(minutes=20))
            gates = {m: Gate(m, HANG_S) for m in ALL}
            middlewares = {m: gate.middleware() for m, gate in gates.items()}
            with (
                local_stack(dsn, middlewares=middlewares, lifecycle=bool(subscribed)) as stack,
                environment({**stack.env, **TEST_ENV}),
            ):
                stack.metering.clock = stack.gcp.clock = stack.azure.clock = clock
                for quota in (stack.metering.quota, stack.gcp.quota, stack.azure.quota):
                    quota.reset(rate=QUOTA)
                customers = PER_MARKETPLACE * len(marketplaces)
                asyncio.run(_seed(dsn, customers, 2, SEED, NEXT, marketplaces))
                asyncio.run(_subscribe_all(stack))
                subscribers = asyncio.run(_subscribe(stack, clock, subscribed)) if subscribed else None
                ids = asyncio.run(identities(dsn))
                for gate in gates.values():
                    gate.identities = ids
                yield World(stack, dsn, clock, gates, ids, subscribers)

    @contextlib.contextmanager
    def _database(self) -> Iterator[str]:
        name = f"fi_{uuid.uuid4().hex[:12]}"
        asyncio.run(_fetch(self.server, f"CREATE DATABASE {name} TEMPLATE {self.template}"))
        try:
            yield urlunsplit(urlsplit(self.server)._replace(path=f"/{name}"))
        finally:
            asyncio.run(_fetch(self.server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))

    def clean(
        self,
        marketplaces: tuple[str, ...],
        hours: tuple[Period, ...],
        subscribed: tuple[str, ...] = (),
        cancelled: tuple[tuple[int, Period], ...] = (),
    ) -> Holdings:
        """What the marketplaces hold after the same hours billed without a fault (once a session).

        ``cancelled``: (index in ``subscribed``, hour) of each customer that cancels at the instant that
        hour's run bills (the clock of ``World.bill``): here just before the run starts, so a faulty world
        that gets it in the middle of the run is compared with the same cancellation at the same time."""
        key = (marketplaces, hours, subscribed, cancelled)
        if key not in _CLEAN:
            with self.world(marketplaces, subscribed) as w:
                for hour in hours:
                    for index, at in cancelled:
                        if at == hour:
                            assert w.subscribers is not None
                            w.clock.billing(hour)
                            tenant = list(w.subscribers.subjects)[index]
                            asyncio.run(w.subscribers.cancel(tenant))
                    w.bill(hour)
                assert w.dead_letters() == []
                _CLEAN[key] = holdings(w.stack, w.identities)
        return _CLEAN[key]

    def prove(
        self,
        scenario: Callable[[World], None],
        *,
        marketplaces: tuple[str, ...] = ALL,
        hours: tuple[Period, ...] = (H,),
        dead_letters_expected: bool = False,
        subscribed: tuple[str, ...] = (),
        cancelled: tuple[tuple[int, Period], ...] = (),
    ) -> Proof:
        """Run ``scenario`` on a fresh world; the marketplaces must hold what a clean run gives them (with
        the customers of ``subscribed``, cancelled in the clean run as ``cancelled`` says: see ``clean``)."""
        clean = self.clean(marketplaces, hours, subscribed, cancelled)
        with self.world(marketplaces, subscribed) as w:
            scenario(w)
            proof = Proof(holdings(w.stack, w.identities), clean, w.ledger(), w.dead_letters(), w.results)
        assert proof.held.duplicates() == {}, "two records for one customer, dimension and hour"
        assert proof.differences() == {}, "(held, held after a clean run) per customer and dimension"
        assert proof.ledger_disagreements() == []
        assert proof.unsettled() == []
        if not dead_letters_expected:
            assert proof.dead_letters == []
        return proof


# Usage of every customer that came from a marketplace's events: in H, and in NEXT before and after the
# instant a cancellation during H's run ends its subscription (H.end + 20 minutes, the run's clock).
SUBSCRIBER_USAGE = (
    (H.start + timedelta(minutes=20), 3),
    (NEXT.start + timedelta(minutes=10), 4),
    (NEXT.start + timedelta(minutes=30), 100),
)


async def _subscribe(stack: LocalStack, clock: Clock, marketplaces: tuple[str, ...]) -> Subscribers:
    """One customer per entry of ``marketplaces``, subscribed through its marketplace's own events half an
    hour before H, with SUBSCRIBER_USAGE."""
    subscribers = Subscribers(stack, clock)
    before, clock.now = clock.now, H.start - timedelta(minutes=30)
    try:
        for i, marketplace in enumerate(marketplaces):
            subject = await subscribers.subscribe(marketplace, f"sub-{marketplace}-{i}")
            conn = await asyncpg.connect(stack.database_url)
            try:
                await conn.executemany(
                    "INSERT INTO usage (ts, customer_id, cluster_id, metric, quantity)"
                    " VALUES ($1, $2, 'c1', 'capacity_gb_hours', $3)",
                    [(at, subject.tenant, quantity) for at, quantity in SUBSCRIBER_USAGE],
                )
            finally:
                await conn.close()
    finally:
        clock.now = before
    return subscribers


async def _fetch(dsn: str, query: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(r) for r in await conn.fetch(query, *args)]
    finally:
        await conn.close()


@pytest.fixture
def lab(postgres_server: str, migrated_template: str) -> Lab:
    return Lab(postgres_server, migrated_template)


# --- duplicate deliveries -------------------------------------------------------------------------------


def test_a_message_delivered_twice_in_sequence_is_billed_once(lab: Lab) -> None:
    deliveries = Deliveries(twice=lambda body: "sequence")

    def scenario(w: World) -> None:
        # Given every message is delivered once more after its first delivery finished
        w.drain.deliveries = deliveries
        # When the hour is billed
        w.bill(H)

    proof = lab.prove(scenario)
    # Then every message's second delivery began after its first had ended, and found its hour billed
    assert len(deliveries.sequential()) == len(ALL) * PER_MARKETPLACE
    outcomes = proof.results[0].stats.outcomes
    assert proof.invocations == 2 * len(ALL) * PER_MARKETPLACE
    assert sum(o.already_billed for o in outcomes) == len(ALL) * PER_MARKETPLACE


def test_a_message_delivered_twice_at_the_same_moment_is_billed_once(lab: Lab) -> None:
    deliveries = Deliveries(twice=lambda body: "at once")

    def scenario(w: World) -> None:
        w.drain.deliveries = deliveries
        w.bill(H)

    lab.prove(scenario)
    # and the two deliveries of every message were in the handler at the same time
    assert len(deliveries.overlapping()) == len(ALL) * PER_MARKETPLACE


def test_a_slow_usage_search_beside_a_twin_delivery_is_billed_once(lab: Lab) -> None:
    deliveries = Deliveries(twice=lambda body: "at once")
    usages: list[FaultyUsage] = []

    def slow(usage: Any) -> FaultyUsage:
        usages.append(FaultyUsage(usage, lambda customer: "slow", slow_s=0.2))
        return usages[-1]

    def scenario(w: World) -> None:
        # Given a usage search that takes a while, and every message delivered twice at the same moment
        w.wrappers = Wrappers(usage_source=slow)
        w.drain.deliveries = deliveries
        w.bill(H)

    lab.prove(scenario)
    # and the searches were slow, and every message's two deliveries overlapped
    # (each took the injected delay: the loop may wake a clock tick early, hence not exactly 0.2)
    took = [seconds for u in usages for seconds in u.slow]
    assert len(took) >= len(ALL) * PER_MARKETPLACE and min(took) >= 0.19
    assert len(deliveries.overlapping()) == len(ALL) * PER_MARKETPLACE


# --- the dispatcher -------------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["in sequence", "at the same moment"])
def test_the_dispatcher_triggered_twice_bills_each_customer_once(lab: Lab, when: str) -> None:
    windows: list[tuple[float, float]] = []

    def scenario(w: World) -> None:
        async def dispatch() -> Any:
            runtime = w.runtime(load_settings())
            began = asyncio.get_running_loop().time()
            try:
                return await runtime.dispatch({"period": H.isoformat()})
            finally:
                windows.append((began, asyncio.get_running_loop().time()))
                await runtime.close()

        async def twice() -> list[Any]:
            if when == "in sequence":
                return [await dispatch(), await dispatch()]
            return list(await asyncio.gather(dispatch(), dispatch()))

        w.clock.billing(H)
        first, second = asyncio.run(twice())
        # When the queue is drained (the scheduled event once more, too)
        result = w.bill(H)
        assert result.dispatch.already_dispatched
        if when == "in sequence":
            assert (first.already_dispatched, second.already_dispatched) == (False, True)

    lab.prove(scenario)
    (_, a_end), (b_start, _) = sorted(windows)
    if when == "at the same moment":  # the two dispatches ran over each other
        assert b_start < a_end
    else:
        assert b_start >= a_end


def test_a_dispatcher_killed_half_way_and_triggered_again_bills_everyone_once(lab: Lab) -> None:
    queues: list[DyingQueue] = []

    def dying(queue: Any) -> DyingQueue:
        queues.append(DyingQueue(queue, after=10))
        return queues[-1]

    def scenario(w: World) -> None:
        # Given a dispatcher that dies after sending its first page of 10 messages
        w.wrappers = Wrappers(queue=dying)
        with pytest.raises(Killed):
            w.bill(H)
        assert [q.died for q in queues] == [True] and sum(queues[0].sent) == 10
        w.wrappers = Wrappers()
        # When the schedule triggers it again
        again = w.bill(H)
        # Then it dispatches every customer again (none was billed), and the first ten twice in all: every
        # message is handled once (a twin delivered while its sibling holds the claim fails once, and
        # comes back)
        assert not again.dispatch.already_dispatched
        assert again.dispatch.dispatched == len(w.customers())
        assert again.stats.succeeded == len(w.customers()) + 10

    lab.prove(scenario)


# --- killed billers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["after the decision", "after the marketplace accepted"])
def test_a_biller_killed_mid_bill_resubmits_its_recorded_decision(lab: Lab, step: str) -> None:
    ledgers: list[KillingLedger] = []
    submissions: dict[str, list[Call]] = {}
    recorded: dict[str, dict[str, int]] = {}

    def scenario(w: World) -> None:
        # Given billers that die for every other customer with usage, once, and usage of the hour that
        # arrives while the biller is dead (a recomputation would bill more); a lease shorter than SQS's
        # redelivery delay
        rows = w.sql("SELECT DISTINCT customer_id FROM usage WHERE ts >= $1 AND ts < $2", H.start, H.end)
        victims = set(sorted(r["customer_id"] for r in rows)[::2])

        def kills(at: str, customer: str) -> bool:
            if at == step and customer in victims:
                victims.discard(customer)
                return True
            return False

        async def usage_arrives(customer: str) -> None:
            await _fetch(
                w.dsn,
                "INSERT INTO usage (ts, customer_id, cluster_id, metric, quantity)"
                " SELECT ts, customer_id, 'late', metric, quantity * 1000 FROM usage"
                " WHERE customer_id = $1 AND ts >= $2 AND ts < $3",
                customer,
                H.start,
                H.end,
            )

        def killing(repo: Any) -> KillingLedger:
            ledgers.append(KillingLedger(repo, kills, on_kill=usage_arrives))
            return ledgers[-1]

        for gate in w.gates.values():
            gate.plan = lambda call: None  # pass every call, keeping its bytes
        w.wrappers = Wrappers(repository=killing)
        w.lease_seconds = 1
        w.bill(H, retry_delay_s=1)
        marketplace = {c: m for (m, _), c in w.identities.items()}
        for _, customer in (k for ledger in ledgers for k in ledger.killed):
            submissions[customer] = w.gates[marketplace[customer]].submissions(customer)
            recorded[customer] = {
                r["dimension"]: r["quantity"]
                for r in w.sql(
                    "SELECT dimension, quantity FROM ledger WHERE customer_id = $1 AND period = $2"
                    " AND state NOT IN ('skipped')",
                    customer,
                    H.start,
                )
            }

    proof = lab.prove(scenario)
    # Then each victim died once, and its redelivery finished the bill
    killed = [customer for ledger in ledgers for _, customer in ledger.killed]
    assert killed and len(killed) == len(set(killed))
    assert proof.failures >= len(killed)
    for customer in killed:
        calls = submissions[customer]
        # the resubmission carried the quantities the decision recorded, not the grown usage
        last = calls[-1]
        assert quantities(last.marketplace, last.body) == recorded[customer], customer
        if step == AFTER_ACCEPT:
            # the marketplace took the first submission; the second is the same request, byte for byte
            assert len(calls) == 2 and calls[1].body == calls[0].body, customer


# --- a cancellation arriving during a run (#13) ----------------------------------------------------------

# A customer that came from its marketplace's events cancels through the marketplace's own cancellation
# (AWS's `License Deprovisioned` EventBridge event, Google's ENTITLEMENT_CANCELLED by Pub/Sub push, Azure's
# `Unsubscribe` webhook), handed to the Subscriptions function's handler in the middle of the customer's
# bill of H. The handler records the end (the run's instant, 20 minutes into NEXT) and sends the final
# bills (H, and NEXT up to the end instant) while H's bill is still in flight. The clean run gets the same
# cancellation at the same instant, just before H's run.

CAPACITY = {"aws": "CapacityGbHours", "gcp": "capacity_gb_hours", "azure": "capacity"}


@pytest.mark.parametrize("step", [AFTER_DECISION, AFTER_ANSWER])
@pytest.mark.parametrize("marketplace", ALL)
def test_a_cancellation_arriving_while_its_hour_is_billed_bills_up_to_the_end_once(
    lab: Lab, marketplace: str, step: str
) -> None:
    cancellations: list[Cancellation] = []
    tenants: list[str] = []
    final_hour: list[dict[str, Any]] = []
    deliveries = Deliveries()

    def scenario(w: World) -> None:
        assert w.subscribers is not None
        subscribers = w.subscribers
        tenants.extend(subscribers.subjects)  # the first cancels, the second stays
        victim = tenants[0]

        # Given the first customer cancels in the middle of its bill of H, at `step`: its marketplace's
        # cancellation event handed to the Subscriptions function's handler
        def when(at: str, customer: str, period: Period) -> bool:
            return at == step and customer == victim and period == H and not cancellations

        async def cancel(at: str, customer: str, period: Period) -> None:
            cancellations.append(await subscribers.cancel(customer, step=at, hour=period))

        w.wrappers = Wrappers(repository=lambda repo: DuringBill(repo, when, cancel))
        w.drain.deliveries = deliveries
        # When H is billed (a delivery that meets the bill in flight comes back a second later, as from SQS)
        w.bill(H, retry_delay_s=1)
        final_hour.extend(
            w.sql(
                "SELECT dimension, state, quantity, last_error FROM ledger"
                " WHERE customer_id = $1 AND period = $2 AND quantity > 0",
                victim,
                NEXT.start,
            )
        )
        # and then NEXT is billed by its scheduled run
        w.bill(NEXT)

    proof = lab.prove(
        scenario,
        marketplaces=(marketplace,),
        hours=(H, NEXT),
        subscribed=(marketplace, marketplace),
        cancelled=((0, H),),
    )
    victim, stays = tenants
    end = H.end + timedelta(minutes=20)
    # Then the cancellation was recorded while the customer's bill of H was in flight (decided, not
    # finished, before and after the handler took it), at `step`, ending the subscription at the run's instant
    assert len(cancellations) == 1
    cancelled = cancellations[0]
    assert (cancelled.subject.tenant, cancelled.step, cancelled.hour) == (victim, step, H)
    assert cancelled.during_bill, cancelled
    assert (cancelled.status, cancelled.ends_at, cancelled.at) == ("ended", end, end)
    assert cancelled.failed_deliveries == ()  # taken at its first delivery
    # and the final bills brought their own message for H beside the run's (two run ids): H billed once
    runs = {
        json.loads(d.body)["run_id"]
        for d in deliveries.windows
        if json.loads(d.body).get("customer_id") == victim and json.loads(d.body)["period"] == H.isoformat()
    }
    assert len(runs) == 2, deliveries.windows
    # and its final partial hour was billed by the final bill, before NEXT was over (before NEXT's run)
    billed = [(r["dimension"], r["state"], r["quantity"]) for r in final_hour]
    assert billed == [(CAPACITY[marketplace], "accepted", 4)], final_hour
    # Then the marketplace holds H and NEXT up to the end once, nothing after the end (the 100 units), and
    # the customer that stayed is billed for both whole hours
    held = {k: q for k, q in proof.held.quantities.items() if k[0] in tenants and q}
    dimension = CAPACITY[marketplace]
    assert held == {
        (victim, dimension, H.start): 3,
        (victim, dimension, NEXT.start): 4,
        (stays, dimension, H.start): 3,
        (stays, dimension, NEXT.start): 104,
    }


# --- the marketplaces fail ------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [429, 500, 503, "timeout", "lost", "reset"])
def test_marketplace_failures_in_bursts_are_retried_and_billed_once(lab: Lab, fault: Fault) -> None:
    gates: list[Gate] = []

    def scenario(w: World) -> None:
        # Given the three marketplaces fail calls in two bursts ("lost": records taken, answer lost)
        for gate in w.gates.values():
            gate.plan = in_bursts(fault)
            gates.append(gate)
        w.bill(H)

    lab.prove(scenario)
    # and every marketplace's client met the fault and called again
    assert all(gate.served[str(fault)] > 0 for gate in gates)
    assert all(gate.retried() for gate in gates)


def test_an_outage_longer_than_the_aws_window_bills_the_hour_with_the_first_hour_still_accepted(
    lab: Lab,
) -> None:
    def scenario(w: World) -> None:
        # Given AWS throttles every call (its own fault injection) while the hour is billed: all in the DLQ
        w.stack.metering.fault_rate, w.stack.metering.fault_kinds = 1.0, ("throttle",)
        w.bill(H)
        assert len(w.dead_letters()) == len(w.customers())
        # When AWS is back 6.5 hours after the hour began (its window is 6 hours) and the DLQ is redriven
        w.stack.metering.fault_rate = 0.0
        late = H.start + WINDOWS["aws"] + timedelta(minutes=30)
        w.redrive()
        w.bill(H, at=late)
        # and the next hour is billed
        w.bill(NEXT, at=late)

    proof = lab.prove(scenario, marketplaces=("aws",), hours=(H, NEXT))
    # Then the hour was settled as expired, and its quantity went with the next hour, still accepted
    assert {r["state"] for r in proof.ledger if r["period"] == H.start} == {"expired"}
    assert proof.held.in_hour(H) == {}
    assert proof.held.in_hour(NEXT) == proof.clean.totals()


# --- the database and the usage source fail --------------------------------------------------------------


def test_database_connections_dropped_mid_run_lose_and_double_nothing(lab: Lab) -> None:
    killers: list[ConnectionKiller] = []

    def scenario(w: World) -> None:
        # Given PostgreSQL terminates three billing connections in the middle of a statement on the ledger
        # (a commit may or may not have happened), and a lease shorter than SQS's redelivery delay
        killers.append(ConnectionKiller(w.dsn))
        w.drain.beside = lambda: killers[0].mid_statement("ledger", budget=3)
        w.lease_seconds = 1
        # When the hour is billed
        w.bill(H, retry_delay_s=1)

    lab.prove(scenario)
    # and each connection died while pg_stat_activity showed it running a statement
    killed = killers[0].killed
    assert len(killed) == 3
    assert all(k.state == "active" and k.waiting == "Lock" and k.query.strip() for k in killed), killed
    assert all(k.died for k in killed), killed


def test_usage_search_timeouts_are_retried_and_billed_once(lab: Lab) -> None:
    lookups: Counter[str] = Counter()

    def flaky(usage: Any) -> FaultyUsage:
        def fault(customer: str) -> str | None:
            lookups[customer] += 1
            return "timeout" if lookups[customer] <= 4 else None

        return FaultyUsage(usage, fault)

    def scenario(w: World) -> None:
        # Given a usage search that times out 4 times for every customer (more than one invocation retries)
        w.wrappers = Wrappers(usage_source=flaky)
        w.bill(H)

    proof = lab.prove(scenario)
    # Then every customer's first invocation gave up and its redelivery billed it
    assert proof.failures == len(ALL) * PER_MARKETPLACE
    assert set(lookups.values()) == {5}


# --- poison messages and the dead-letter queue -----------------------------------------------------------

POISON = (
    "Hello from SQS!",
    json.dumps(
        {"version": 2, "customer_id": "cust-000001", "period": H.isoformat(), "run_id": str(uuid.uuid4())}
    ),
    json.dumps({"version": 1, "customer_id": "nobody", "period": H.isoformat(), "run_id": str(uuid.uuid4())}),
    json.dumps({"version": 1, "customer_id": "cust-000001", "period": "2026-01-01T00:30:00Z", "run_id": "x"}),
)


def test_poison_messages_beside_good_ones_end_in_the_dlq_and_the_good_ones_are_billed(lab: Lab) -> None:
    max_receive_count = QueueSettings.from_template().max_receive_count

    def scenario(w: World) -> None:
        # Given poison messages in the queue beside the hour's messages
        w.send(*POISON)
        # When the hour is billed
        w.bill(H)

    proof = lab.prove(scenario, dead_letters_expected=True)
    # Then each poison message failed maxReceiveCount times and then moved to the DLQ, nothing else did
    assert proof.dead_letters == sorted(POISON)
    assert proof.failures == len(POISON) * max_receive_count


def test_a_poison_record_in_a_lambda_batch_fails_alone(lab: Lab) -> None:
    import biller  # the handler module, as Lambda imports it

    def scenario(w: World) -> None:
        # Given one several-record SQS event: every customer's message, and the poison messages among them
        bodies = [w.body(c) for c in w.customers()]
        for i, poison in enumerate(POISON):
            bodies.insert(1 + 7 * i, poison)
        event = {"Records": [sqs_record(b, message_id=f"msg-{i:03d}") for i, b in enumerate(bodies)]}
        w.clock.billing(H)
        # the handler module's runtime, built by the composition root with this world's clock
        with _handler_runtime(biller, w.runtime(load_settings())):
            # When the biller Lambda handles it
            response = biller.lambda_handler(event, LambdaContext.of())
        # Then exactly the poison records are reported as failed
        failed = {f["itemIdentifier"] for f in response["batchItemFailures"]}
        poisoned = {f"msg-{i:03d}" for i, b in enumerate(bodies) if b in POISON}
        assert len(poisoned) == len(POISON) and failed == poisoned

    lab.prove(scenario)


def test_messages_dead_lettered_during_an_outage_are_billed_once_redriven(lab: Lab) -> None:
    def scenario(w: World) -> None:
        # Given all three marketplaces answer 503 until every message with something to send is dead-lettered
        for gate in w.gates.values():
            gate.plan = always(503)
        w.bill(H)
        dead = len(w.dead_letters())
        assert dead > 0
        # When the outage is over and the dead-letter queue is redriven (`billing redrive`)
        for gate in w.gates.values():
            gate.plan = None
        assert w.redrive() == dead
        w.bill(H)

    lab.prove(scenario)


# --- late usage -----------------------------------------------------------------------------------------


def test_usage_arriving_after_its_hour_was_billed_is_billed_with_the_next_hour(lab: Lab) -> None:
    def scenario(w: World) -> None:
        # Given the readings of the hour's second half are not in the usage source yet when it is billed
        late = w.sql(
            "DELETE FROM usage WHERE ts >= $1 AND ts < $2"
            " RETURNING ts, customer_id, cluster_id, metric, quantity",
            H.start + timedelta(minutes=30),
            H.end,
        )
        assert late
        w.bill(H)
        # When they arrive, and then the next hour is billed
        w.sql(
            "INSERT INTO usage (ts, customer_id, cluster_id, metric, quantity)"
            " SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::numeric[])",
            *(list(column) for column in zip(*[tuple(r.values()) for r in late], strict=True)),
        )
        w.bill(NEXT)

    proof = lab.prove(scenario, hours=(H, NEXT))
    # Then the late quantity went with the next hour
    assert proof.held.in_hour(H) != proof.clean.in_hour(H)


# --- money bugs: an answer lost, then a definite refusal, then the window closes --------------------------

# These two found money bugs (fixed by the ledger's `unconfirmed` flag and by the AWS adapter treating
# a call botocore retried as unconfirmed): a submission whose answer was lost was forgotten once a later
# attempt was refused outright, and past the window its quantity was carried to a later hour and billed
# a second time.


@pytest.mark.parametrize("marketplace", ALL)
def test_a_lost_answer_then_a_refused_retry_is_not_billed_again_after_the_window(
    lab: Lab, marketplace: str
) -> None:
    refusal = {"aws": always(429), "gcp": always(503, "check"), "azure": always(503)}[marketplace]

    def scenario(w: World) -> None:
        gate = w.gates[marketplace]
        # Given the marketplace takes the hour's records but its answer is lost, and answers the retries
        # with 500 (which may or may not have been processed): the rows stay 'submitted'
        gate.plan = lost_once_then(500)
        w.bill(H)
        assert w.states(H) - {"skipped"} == {"submitted"}  # skipped: Azure gets no zero quantity
        # and the retries (another execution environment, after the redrive) are refused outright: 'failed'
        gate.plan = refusal
        w.redrive()
        w.bill(H)
        # (AWS: botocore retried the refused call, so the adapter cannot call it certain: 'submitted')
        assert w.states(H) - {"skipped"} <= {"failed", "submitted"}
        # When the marketplace is back after the window closed, the DLQ is redriven and the next hour billed
        gate.plan = None
        late = H.start + WINDOWS[marketplace] + timedelta(minutes=30)
        w.redrive()
        w.bill(H, at=late)
        w.bill(NEXT, at=late)

    lab.prove(scenario, marketplaces=(marketplace,), hours=(H, NEXT))


def test_a_botocore_retry_refused_after_a_lost_answer_is_not_billed_again_after_the_window(lab: Lab) -> None:
    def scenario(w: World) -> None:
        # Given every BatchMeterUsage call of the hour is taken by AWS with its answer lost, and botocore's
        # retry of it (inside the same call) is throttled: the call ends in ThrottlingException
        attempts: Counter[tuple[str, ...]] = Counter()

        def lost_then_throttled(call: Call) -> Fault | None:
            attempts[call.customers] += 1
            return "lost" if attempts[call.customers] % 2 else 429

        w.gates["aws"].plan = lost_then_throttled
        w.bill(H)
        # (the answer was lost and the retry throttled: nothing confirmed)
        assert w.gates["aws"].served["lost"] > 0 and w.gates["aws"].served["429"] > 0
        assert w.states(H) == {"submitted"}
        # When AWS is back after the 6-hour window, the DLQ is redriven and the next hour billed
        w.gates["aws"].plan = None
        late = H.start + WINDOWS["aws"] + timedelta(minutes=30)
        w.redrive()
        w.bill(H, at=late)
        w.bill(NEXT, at=late)

    lab.prove(scenario, marketplaces=("aws",), hours=(H, NEXT))


@pytest.mark.parametrize("fault", ["lost", "reset"])
def test_the_window_closing_between_two_attempts_of_one_call_does_not_bill_the_hour_again(
    lab: Lab, fault: str
) -> None:
    late = H.start + WINDOWS["aws"] + timedelta(minutes=30)

    def scenario(w: World) -> None:
        # Given AWS takes the first customer's records but the answer is lost (or the connection reset),
        # and its clock passes the hour's 6-hour window meanwhile: the adapter's retry of that call is
        # refused as out of bounds (every other call gets a definite answer: accepted, or out of bounds)
        calls = itertools.count()

        def lost_once(call: Call) -> Fault | None:
            return fault if next(calls) == 0 else None

        def window_closes() -> None:
            w.clock.now = late

        w.gates["aws"].plan = lost_once
        w.gates["aws"].after_lost = window_closes
        w.bill(H)
        # (the first call was taken and its answer lost, the window closed meanwhile, the retry was sent)
        assert w.gates["aws"].served[fault] == 1 and w.clock.now == late
        assert w.gates["aws"].retried()
        # When the next hour is billed (still inside its own window)
        w.gates["aws"].plan = None
        w.bill(NEXT, at=late)

    # Then AWS holds what a clean run gives it: an hour it may hold is never carried to the next one
    lab.prove(scenario, marketplaces=("aws",), hours=(H, NEXT))


# --- a connection reset (RST) while the answer is read ------------------------------------------------------

# Found a money bug: aiobotocore raises EndpointConnectionError for a RST while it reads the answer, the
# class of a refused connect, and the AWS adapter recorded the rows as certainly not taken ('failed'); past
# the window the hour was settled as expired and its quantity billed again with the next hour.


@pytest.mark.parametrize("marketplace", ALL)
def test_a_connection_reset_after_the_marketplace_took_the_hour_is_not_billed_again_after_the_window(
    lab: Lab, marketplace: str
) -> None:
    first_answers: list[dict[str, Any]] = []

    def scenario(w: World) -> None:
        gate = w.gates[marketplace]
        # Given the marketplace takes every metering call of the hour and the connection is then reset
        # (RST) while the biller reads the answer, until every message is in the dead-letter queue
        gate.plan = always("reset", "meter", "report", "batch")
        w.bill(H)
        assert gate.served["reset"] > 0 and len(w.dead_letters()) > 0
        first_answers.extend(
            w.sql("SELECT state, last_error FROM ledger WHERE period = $1 AND state <> 'skipped'", H.start)
        )
        # When the marketplace answers again only after the window closed, the DLQ is redriven and the next
        # hour billed
        gate.plan = None
        late = H.start + WINDOWS[marketplace] + timedelta(minutes=30)
        w.redrive()
        w.bill(H, at=late)
        w.bill(NEXT, at=late)

    # Then the marketplaces hold what a clean run gives them: the reset hour is not carried and billed again
    proof = lab.prove(scenario, marketplaces=(marketplace,), hours=(H, NEXT))
    assert {r["state"] for r in proof.ledger if r["period"] == H.start} - {"skipped"} == {"rejected"}
    # and it was a reset, not a clean close (the client read ECONNRESET), recorded as maybe taken
    assert first_answers and all(RESET in (r["last_error"] or "") for r in first_answers), first_answers
    assert {r["state"] for r in first_answers} == {"submitted"}


@contextlib.contextmanager
def _handler_runtime(module: Any, runtime: Runtime) -> Iterator[None]:
    """The handler module's runtime for the block: what its module init would build with this clock."""
    from billing.entrypoints.loop import LOOP

    built, module.runtime = module.runtime, runtime
    try:
        yield
    finally:
        module.runtime = built
        LOOP.run_until_complete(runtime.close())

"""Chaos: customer-hours billed through the local runner under random faults of every kind, and the same data
billed clean; the marketplaces must end up holding the same quantities.

``python -m bench.chaos [--customer-hours 10000] [--hours 4] [--seed S]`` bills ``customer-hours / hours``
synthetic customers (AWS, Google and Azure in turn) for ``hours`` consecutive hours, hour by hour with
``billing_local.local_run.run_hour`` (the dispatcher, then a fixed pool of consumers draining moto's SQS),
twice, each time on a fresh database and a fresh local stack:

- clean: no fault;
- chaos, during each hour's first drain: marketplace calls answered 429, 500 or 503, never answered (a
  timeout), or taken and their answer lost, or taken and their connection reset (RST) while the answer is
  read (an aiohttp middleware in front of each emulator), plus the AWS
  emulator's own throttling, internal errors and UnprocessedRecords; messages delivered twice, in sequence
  and at the same moment; billers killed after recording their decision, or after the marketplace accepted
  and before the ledger recorded it; every billing connection terminated by PostgreSQL every few seconds;
  usage searches that time out or are slow; poison messages; usage arriving after its hour was billed; one
  marketplace down (503) for the drain's first seconds, long enough to dead-letter many of its messages;
  subscription cancellations (#13) arriving while the run bills that customer's hour: a share of the
  customers come from the marketplaces' own events (AWS license events, Google Procurement pushes, Azure's
  landing page and webhook, handed to the Subscriptions function's handler), and some of them cancel in the
  middle of their bill of a random hour (right after its decision, or after the marketplace answered), the
  handler sending their final bills on the same queue. The clean run gets the same cancellations at the
  same virtual instant, just before that hour's run.
  Then the faults stop, the dead-letter queue is redriven (``billing redrive``'s code) and drained, until
  every customer-hour is settled.

It prints the customer-hours, the double-billed and lost (customer, dimension) pairs and the total quantity
difference against the clean run (all three must be 0), how many cancellations fired during their
customer's bill and any record held for an hour after a cancelled subscription's end (must be none), and
the wall time; writes bench/results/chaos.json; exits 1 if any of these is not 0. Both runs use moto
with bench.moto_linear's fixes (as shipped, moto's SQS costs O(queue depth) per message: 2,500 messages
an hour would take minutes to dispatch and drain).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from bench.common import machine, write_json
from billing_local.faults import (
    AFTER_ACCEPT,
    AFTER_ANSWER,
    AFTER_DECISION,
    Clock,
    ConnectionKiller,
    Deliveries,
    Drain,
    DuringBill,
    FaultyUsage,
    Gate,
    KillingLedger,
    RandomFaults,
    ShortMarketplaceTimeouts,
    Subscribers,
    dead_letters,
    held_records,
    identities,
    redrive,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

ALL = ("aws", "gcp", "azure")
TIMEOUT_S = 2.0  # how long the marketplace clients wait for an answer in the chaos run
HANG_S = TIMEOUT_S + 0.5  # how long a faulty emulator sits on a request
LEASE_S = 2  # shorter than the runner's first redelivery delay (1 s, then 2 s, ...), as 120 s is to 360 s
QUOTA = 50  # calls a second per account, project and publisher, enforced by the emulators
ENV = {
    "POWERTOOLS_LOG_LEVEL": "CRITICAL",
    "POWERTOOLS_METRICS_DISABLED": "true",
    "BILLING_MARKETPLACE_ATTEMPTS": "3",
    "BILLING_GCP_TIMEOUT_SECONDS": str(TIMEOUT_S),
    "BILLING_AZURE_TIMEOUT_SECONDS": str(TIMEOUT_S),
    # quotas on: each emulator refuses past QUOTA calls a second, and each lane is paced under it
    **{f"BILLING_{m.upper()}_QUOTA_PER_SECOND": str(QUOTA) for m in ALL},
}


@dataclass(frozen=True)
class Rates:
    """How often each fault strikes during an hour's first drain."""

    marketplace: float = 0.03  # of marketplace calls: 429, 500, 503, timeout, answer lost or reset, alike
    aws_emulator: float = 0.02  # of AWS calls, the emulator's own: throttling, internal error, unprocessed
    twice_in_sequence: float = 0.02  # of messages
    twice_at_once: float = 0.02
    kill_after_decision: float = 0.01  # of bills
    kill_after_accept: float = 0.01
    usage_timeout: float = 0.03  # of usage searches
    slow_usage: float = 0.02
    late_usage: float = 0.05  # of customers, each hour but the last: their second-half readings come late
    db_terminate_every_s: float = 1.0
    poison_per_hour: int = 5
    # each hour one marketplace in turn is down this long when the drain starts: its messages that fail
    # maxReceiveCount times meanwhile end in the dead-letter queue, redriven once the faults are over
    outage_s: float = 25.0  # > 1+2+3+4+5 s: the runner's redelivery delays before a 6th receive dead-letters
    # of customers: they come from the marketplaces' own events (at least one per marketplace) ...
    subscribers: float = 0.01
    # ... and of those, the share that cancel while the run bills their hour (at least one)
    cancelled: float = 0.67


@dataclass(frozen=True)
class SubscriberPlan:
    """The customers that come from the marketplaces' events, their usage and their cancellations: the
    same in the clean and the chaos run (drawn from the seed alone)."""

    marketplaces: tuple[str, ...]  # one subscriber each, in order
    usage: tuple[tuple[int, int, int, int], ...]  # (subscriber, hour from the first, minute, quantity)
    cancels: dict[int, tuple[int, str]]  # subscriber -> (the hour whose run it cancels in, DuringBill step)

    @classmethod
    def draw(cls, customers: int, hours: int, seed: int, rates: Rates) -> SubscriberPlan:
        rng = random.Random(f"{seed}-subscribers")
        count = max(len(ALL), round(customers * rates.subscribers))
        marketplaces = tuple(ALL[i % len(ALL)] for i in range(count))
        # every subscriber uses capacity twice an hour, one hour more than billed: a cancellation during
        # the last hour's run ends the subscription 20 minutes into that extra hour
        usage = tuple(
            (i, h, minute, rng.randint(1, 9))
            for i in range(count)
            for h in range(hours + 1)
            for minute in (10, 40)
        )
        chosen = rng.sample(range(count), max(1, round(count * rates.cancelled)))
        cancels = {
            i: (rng.randrange(hours), rng.choice((AFTER_DECISION, AFTER_ANSWER))) for i in sorted(chosen)
        }
        return cls(marketplaces, usage, cancels)


@dataclass
class Injected:
    """What the chaos run actually injected, by kind."""

    counts: Counter[str] = field(default_factory=Counter)

    def add(self, kind: str, n: int = 1) -> None:
        if n:
            self.counts[kind] += n


class _CountingRandom(random.Random):
    """The AWS emulator's random source; it draws a fault kind with ``choice`` (only), so count those."""

    injected: Injected | None = None

    def choice(self, seq: Any) -> Any:
        chosen = super().choice(seq)
        if self.injected is not None:
            self.injected.add(f"aws emulator {chosen}")
        return chosen


# --- the faults (billing_local.faults, shared with the fault-injection suite) --------------------------


@dataclass
class Chaos:
    """The faults of the billing code and the runner; all off (``on`` False) in the clean run and between
    an hour's first drain and its redrives. Each fault goes in through a parameter: the composition
    root's ``wrappers`` (ledger, usage source), ``run_hour``'s drain (deliveries, connections)."""

    clock: Clock
    rates: Rates
    rng: random.Random
    injected: Injected
    dsn: str
    on: bool = False
    deliveries: Deliveries = field(init=False)
    killer: ConnectionKiller = field(init=False)
    usages: list[FaultyUsage] = field(default_factory=list)
    ledgers: list[KillingLedger] = field(default_factory=list)
    subscribers: Subscribers | None = None
    # this hour's cancellations still to arrive during their customer's bill: tenant -> (hour, step)
    cancel_during: dict[str, tuple[Any, str]] = field(default_factory=dict)
    cancel_failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.deliveries = Deliveries(twice=self._twice)
        self.killer = ConnectionKiller(self.dsn)

    def strikes(self, rate: float) -> bool:
        return self.on and self.rng.random() < rate

    def _twice(self, body: str) -> str | None:
        if self.strikes(self.rates.twice_in_sequence):
            return "sequence"
        return "at once" if self.strikes(self.rates.twice_at_once) else None

    def _kills(self, step: str, customer: str) -> bool:
        rate = {AFTER_DECISION: self.rates.kill_after_decision, AFTER_ACCEPT: self.rates.kill_after_accept}
        return self.strikes(rate[step])

    def _cancels(self, step: str, customer: str, period: Any) -> bool:
        due = self.cancel_during.get(customer)
        if self.on and due == (period, step):
            del self.cancel_during[customer]  # once, whatever the delivery does
            return True
        return False

    async def _cancel(self, step: str, customer: str, period: Any) -> None:
        assert self.subscribers is not None
        try:
            await self.subscribers.cancel(customer, step=step, hour=period)
        except Exception as exc:  # not taken after every redelivery: it arrives after the drain instead
            self.cancel_failures.append(f"{customer}: {type(exc).__name__}: {exc}")
            self.cancel_during[customer] = (period, "after the run")

    def _usage_fault(self, customer: str) -> str | None:
        if self.strikes(self.rates.usage_timeout):
            return "timeout"
        return "slow" if self.strikes(self.rates.slow_usage) else None

    def runtime(self, settings: Any) -> Any:
        """The composition root with the virtual clock, a short lease, short marketplace timeouts and the
        ledger and usage faults around its real adapters."""
        import aioboto3

        from billing.bootstrap import Runtime, Wrappers

        def ledger(repo: Any) -> Any:
            self.ledgers.append(KillingLedger(repo, self._kills))
            return DuringBill(self.ledgers[-1], self._cancels, self._cancel)

        def usage(source: Any) -> FaultyUsage:
            self.usages.append(FaultyUsage(source, self._usage_fault, slow_s=0.3))
            return self.usages[-1]

        return Runtime(
            settings.model_copy(update={"lease_seconds": LEASE_S}),
            clock=self.clock,
            aws_session=ShortMarketplaceTimeouts(aioboto3.Session(), TIMEOUT_S),
            wrappers=Wrappers(repository=ledger, usage_source=usage),
        )

    def drain(self) -> Drain:
        """The runner's drain with duplicate deliveries, and PostgreSQL terminating busy connections."""
        return Drain(
            deliveries=self.deliveries,
            beside=lambda: self.killer.every(self.rates.db_terminate_every_s, on=lambda: self.on),
        )

    def count(self, gates: dict[str, Gate]) -> None:
        """Add what was injected to ``injected``, from what each fault recorded."""
        windows = self.deliveries.duplicated.values()
        self.injected.add(
            "message delivered twice in sequence", sum(1 for how in windows if how == "sequence")
        )
        self.injected.add("message delivered twice at once", sum(1 for how in windows if how == "at once"))
        for ledger in self.ledgers:
            for step, _ in ledger.killed:
                self.injected.add(f"biller killed {step}")
        for source in self.usages:
            self.injected.add("usage search timed out", source.faults["timeout"])
            self.injected.add("usage search slow", source.faults["slow"])
        self.injected.add("database connection terminated", len(self.killer.killed))
        for c in self.subscribers.cancellations if self.subscribers is not None else []:
            kind = f"cancelled mid-bill ({c.step})" if c.during_bill else "cancelled after the run"
            self.injected.add(kind)
        for marketplace, gate in gates.items():
            assert isinstance(gate.plan, RandomFaults)
            for kind, n in gate.plan.chosen.items():
                self.injected.add(f"{marketplace} {kind}", n)


# --- one run: a fresh database and stack ----------------------------------------------------------------


@dataclass
class Run:
    """What one run leaves: the marketplaces' records, the ledger's view, the runner's counts."""

    name: str
    held: dict[tuple[str, str, datetime], list[int]] = field(default_factory=dict)
    ledger: dict[tuple[str, str, datetime], tuple[str, int]] = field(default_factory=dict)
    invocations: int = 0
    failed: int = 0
    redrive_rounds: int = 0
    redriven: int = 0
    unbilled_after: list[str] = field(default_factory=list)
    dead_letters: list[str] = field(default_factory=list)
    injected: Injected = field(default_factory=Injected)
    poison: set[str] = field(default_factory=set)  # every poison body sent
    hours_billed: int = 0
    seconds: float = 0.0
    ends: dict[str, datetime] = field(default_factory=dict)  # cancelled customer -> its subscription's end
    cancel_failures: list[str] = field(default_factory=list)

    def totals(self) -> Counter[tuple[str, str]]:
        out: Counter[tuple[str, str]] = Counter()
        for (customer, dimension, _), quantities in self.held.items():
            out[customer, dimension] += sum(quantities)
        return out


def bill_hours(
    name: str,
    server: str,
    customers: int,
    hours: int,
    seed: int,
    rates: Rates | None,
    concurrency: int,
    plan: SubscriberPlan,
) -> Run:
    """Bill ``hours`` hours for ``customers`` customers (and ``plan``'s subscribers) on a fresh database and
    stack; chaos if ``rates``."""
    from billing_local.local_run import subscribe_all as _subscribe_all
    from billing_local.migrate import migrate
    from billing_local.stack import environment, local_stack

    run = Run(name)
    began = time.perf_counter()
    first = first_hour(hours)
    clock = Clock(first.end + timedelta(minutes=20))
    injected = run.injected
    rng = random.Random(f"{seed}-{name}")
    chaos_rng = random.Random(rng.random())
    gates = {m: Gate(m, HANG_S) for m in ALL}
    for gate in gates.values():
        gate.plan = RandomFaults(random.Random(rng.random()))
    with _database(server, name) as dsn:
        chaos = Chaos(clock, rates or Rates(), chaos_rng, injected, dsn)
        asyncio.run(migrate(dsn))
        middlewares = {m: gate.middleware() for m, gate in gates.items()}
        # moto with bench.moto_linear's fixes: as shipped, its SQS costs O(queue depth) per message
        with (
            local_stack(
                dsn, middlewares=middlewares, moto_module="bench.moto_linear", lifecycle=True
            ) as stack,
            environment({**stack.env, **ENV}),
        ):
            stack.metering.clock = stack.gcp.clock = stack.azure.clock = clock
            stack.metering.rng = _CountingRandom(rng.random())
            stack.metering.rng.injected = injected
            stack.metering.fault_kinds = ("throttle", "internal", "unprocessed")
            for quota in (stack.metering.quota, stack.gcp.quota, stack.azure.quota):
                quota.reset(rate=QUOTA)
            asyncio.run(_seed(dsn, customers, hours, seed, first.shifted(hours - 1)))
            asyncio.run(_subscribe_all(stack))
            subscribers = chaos.subscribers = Subscribers(stack, clock)
            tenants = asyncio.run(_subscribe(subscribers, plan, first, clock))
            ids = asyncio.run(identities(dsn))
            for gate in gates.values():
                gate.identities = ids
            for h in range(hours):
                hour = first.shifted(h)
                clock.now = hour.end + timedelta(minutes=20)
                due = {tenants[i]: step for i, (at, step) in plan.cancels.items() if at == h}
                if rates is None:  # clean: the same cancellations at the same instant, before the run
                    for tenant in due:
                        asyncio.run(subscribers.cancel(tenant))
                else:
                    chaos.cancel_during = {tenant: (hour, step) for tenant, step in due.items()}
                late: list[tuple[Any, ...]] = []
                if rates is not None and h < hours - 1:
                    late = asyncio.run(_hold_back(dsn, hour, customers, rates.late_usage, chaos.rng))
                    injected.add("late usage readings", len(late))
                _bill_hour(run, stack, hour, chaos, gates, rates, concurrency)
                if late:
                    asyncio.run(_arrive(dsn, late))
            chaos.count(gates)
            run.ends = {c.subject.tenant: c.at for c in subscribers.cancellations}
            run.cancel_failures = chaos.cancel_failures
            _collect(run, stack, ids, dsn)
    run.seconds = time.perf_counter() - began
    return run


def _bill_hour(
    run: Run,
    stack: Any,
    hour: Any,
    chaos: Chaos,
    gates: dict[str, Gate],
    rates: Rates | None,
    concurrency: int,
) -> None:
    """The hour's scheduled run (chaos on, if any), then redrives until every customer-hour is settled."""
    poison = _poison(hour, rates.poison_per_hour) if rates is not None else []
    plans = {m: gate.plan for m, gate in gates.items() if isinstance(gate.plan, RandomFaults)}
    if rates is not None:
        chaos.on = True
        for plan in plans.values():
            plan.rate = rates.marketplace
        plans[ALL[run.hours_billed % len(ALL)]].down_until = time.monotonic() + rates.outage_s
        stack.metering.fault_rate = rates.aws_emulator
        _send(stack.queue_url, poison)
        chaos.injected.add("poison messages", len(poison))
        run.poison.update(poison)
    try:
        result = _run_hour(hour, chaos, concurrency)
    finally:
        chaos.on = False
        for plan in plans.values():
            plan.rate, plan.down_until = 0.0, 0.0
        stack.metering.fault_rate = 0.0
        run.hours_billed += 1
    run.invocations += result.stats.invocations
    run.failed += result.stats.failed
    if chaos.cancel_during:
        # a cancellation whose customer's bill it did not meet (the biller was killed before the step, or
        # nothing was sent) arrives now, at the same instant, and its final bills are drained
        assert chaos.subscribers is not None
        for tenant in list(chaos.cancel_during):
            del chaos.cancel_during[tenant]
            asyncio.run(chaos.subscribers.cancel(tenant))
        result = _run_hour(hour, chaos, concurrency)
        run.invocations += result.stats.invocations
        run.failed += result.stats.failed
    # the faults are over: redrive what the dead-letter queue holds (poison goes back there) and drain
    for _ in range(5):
        stranded = [body for body in dead_letters(stack) if body not in run.poison]
        if not result.report.unbilled and not stranded:
            break
        run.redrive_rounds += 1
        run.redriven += int(redrive(stack).moved)
        result = _run_hour(hour, chaos, concurrency)
        run.invocations += result.stats.invocations
        run.failed += result.stats.failed
    run.unbilled_after += [
        f"{hour}: {c} (deliveries: {'; '.join(_deliveries(chaos, c, hour)) or 'none'})"
        for c in result.report.unbilled
    ]


def _run_hour(hour: Any, chaos: Chaos, concurrency: int) -> Any:
    from billing_local.local_run import run_hour

    event = {"period": hour.isoformat()}
    return asyncio.run(
        run_hour(event, concurrency, retry_delay_s=1, runtime=chaos.runtime, drain=chaos.drain(), quiet=True)
    )


def _deliveries(chaos: Chaos, customer_id: str, hour: Any) -> list[str]:
    """What the handler saw of this customer-hour's messages."""
    seen: list[str] = []
    for window in chaos.deliveries.windows:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            message = json.loads(window.body)
            if message.get("customer_id") == customer_id and message.get("period", "").startswith(
                hour.start.strftime("%Y-%m-%dT%H")
            ):
                seen.append(f"#{window.receive_count} {window.outcome}")
    return seen


def _collect(run: Run, stack: Any, ids: dict[tuple[str, str], str], dsn: str) -> None:
    run.held = held_records(stack, ids)
    rows = asyncio.run(_fetch(dsn, "SELECT customer_id, dimension, period, state, quantity FROM ledger"))
    run.ledger = {(r["customer_id"], r["dimension"], r["period"]): (r["state"], r["quantity"]) for r in rows}
    run.dead_letters = dead_letters(stack)


# --- the comparison -------------------------------------------------------------------------------------


@dataclass
class Verdict:
    customer_hours: int
    double_billed: int  # (customer, dimension) pairs billed more than clean, or an hour held twice
    lost: int  # (customer, dimension) pairs billed less than clean
    quantity_difference: int  # sum over pairs of |chaos - clean|
    units_over: int
    units_under: int
    hours_held_twice: list[str]
    differences: list[str]
    ledger_disagreements: list[str]
    unsettled_rows: int
    after_end: list[str]  # records held for an hour after a cancelled subscription's end

    @property
    def ok(self) -> bool:
        return self.double_billed == 0 and self.lost == 0 and self.quantity_difference == 0


def compare(clean: Run, chaos: Run, customer_hours: int) -> Verdict:
    from billing.domain.model import LedgerState

    a, b = clean.totals(), chaos.totals()
    over = {k: b[k] - a[k] for k in a.keys() | b.keys() if b[k] > a[k]}
    under = {k: a[k] - b[k] for k in a.keys() | b.keys() if b[k] < a[k]}
    twice = sorted(f"{c} {d} {h:%Y-%m-%dT%H}" for (c, d, h), q in chaos.held.items() if len(q) > 1)
    finals = {s.value for s in LedgerState if s.final}
    disagreements = []
    for key, quantities in chaos.held.items():
        row = chaos.ledger.get(key)
        if row is None or row[1] != sum(quantities) or row[0] not in ("accepted", "duplicate", "rejected"):
            disagreements.append(f"{key[0]} {key[1]} {key[2]:%Y-%m-%dT%H}: held {quantities}, ledger {row}")
    for key, (state, quantity) in chaos.ledger.items():
        if state in ("accepted", "duplicate") and key not in chaos.held:
            disagreements.append(
                f"{key[0]} {key[1]} {key[2]:%Y-%m-%dT%H}: ledger {state} {quantity}, not held"
            )
    from billing.domain.model import hour_floor

    after_end = sorted(
        f"{run.name}: {c} {d} {h:%Y-%m-%dT%H}: {q} (ended {run.ends[c]:%H:%M})"
        for run in (clean, chaos)
        for (c, d, h), q in run.held.items()
        if c in run.ends and h > hour_floor(run.ends[c]) and any(q)
    )
    return Verdict(
        customer_hours=customer_hours,
        double_billed=len(over) + len(twice),
        lost=len(under),
        quantity_difference=sum(over.values()) + sum(under.values()),
        units_over=sum(over.values()),
        units_under=sum(under.values()),
        hours_held_twice=twice[:20],
        differences=[
            f"{c} {d}: chaos {b[c, d]}, clean {a[c, d]}" for c, d in sorted(over.keys() | under.keys())
        ][:20],
        ledger_disagreements=disagreements[:20],
        unsettled_rows=sum(1 for state, _ in chaos.ledger.values() if state not in finals),
        after_end=after_end[:20],
    )


# --- plumbing -------------------------------------------------------------------------------------------


def first_hour(hours: int) -> Any:
    """The first billed hour: the ``hours`` hours end two days ago (the dispatcher bills only ended hours)."""
    from billing.domain.model import Period, hour_floor

    return Period(hour_floor(datetime.now(UTC)) - timedelta(hours=48 + hours))


@contextlib.contextmanager
def _database(server: str, name: str) -> Iterator[str]:
    db = f"chaos_{name}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_execute(server, f"CREATE DATABASE {db}"))
    try:
        yield urlunsplit(urlsplit(server)._replace(path=f"/{db}"))
    finally:
        asyncio.run(_execute(server, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"))


async def _execute(dsn: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _fetch(dsn: str, query: str, *args: Any) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def _seed(dsn: str, customers: int, hours: int, seed: int, last: Any) -> None:
    import asyncpg

    from billing_local.seed import seed as seed_data

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        await seed_data(pool, customers, hours, seed, last, ALL)
    finally:
        await pool.close()


async def _subscribe(subscribers: Subscribers, plan: SubscriberPlan, first: Any, clock: Clock) -> list[str]:
    """``plan``'s subscribers, through their marketplaces' own events half an hour before the first hour,
    with their usage; their customer ids, in plan order."""
    import asyncpg

    before, clock.now = clock.now, first.start - timedelta(minutes=30)
    try:
        tenants = [
            (await subscribers.subscribe(m, f"chaos-{m}-{i}")).tenant for i, m in enumerate(plan.marketplaces)
        ]
    finally:
        clock.now = before
    conn = await asyncpg.connect(subscribers.stack.database_url)
    try:
        await conn.executemany(
            "INSERT INTO usage (ts, customer_id, cluster_id, metric, quantity)"
            " VALUES ($1, $2, 'c1', 'capacity_gb_hours', $3)",
            [
                (first.start + timedelta(hours=h, minutes=minute), tenants[i], quantity)
                for i, h, minute, quantity in plan.usage
            ],
        )
    finally:
        await conn.close()
    return tenants


async def _hold_back(dsn: str, hour: Any, customers: int, share: float, rng: random.Random) -> list[Any]:
    """Take the second half-hour's readings of a share of the customers out of the usage source."""
    from billing_local.seed import customer_id

    chosen = [customer_id(i) for i in range(customers) if rng.random() < share]
    rows = await _fetch(
        dsn,
        "DELETE FROM usage WHERE customer_id = ANY($1::text[]) AND ts >= $2 AND ts < $3"
        " RETURNING ts, customer_id, cluster_id, metric, quantity",
        chosen,
        hour.start + timedelta(minutes=30),
        hour.end,
    )
    return [tuple(r.values()) for r in rows]


async def _arrive(dsn: str, rows: list[tuple[Any, ...]]) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "usage", records=rows, columns=["ts", "customer_id", "cluster_id", "metric", "quantity"]
        )
    finally:
        await conn.close()


def _poison(hour: Any, n: int) -> list[str]:
    kinds = [
        lambda i: f"Hello from SQS! {hour} #{i}",
        lambda i: json.dumps(
            {"version": 2, "customer_id": "cust-000001", "period": hour.isoformat(), "n": i}
        ),
        lambda i: json.dumps(
            {
                "version": 1,
                "customer_id": f"nobody-{i}",
                "period": hour.isoformat(),
                "run_id": str(uuid.uuid4()),
            }
        ),
        lambda i: json.dumps(
            {"version": 1, "customer_id": "cust-000001", "period": f"{hour}#{i}", "run_id": "x"}
        ),
    ]
    return [kinds[i % len(kinds)](i) for i in range(n)]


def _sqs() -> Any:
    import boto3

    return boto3.client("sqs")


def _send(queue_url: str, bodies: list[str]) -> None:
    sqs = _sqs()
    for body in bodies:
        sqs.send_message(QueueUrl=queue_url, MessageBody=body)


# --- main -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--customer-hours", type=int, default=10_000)
    parser.add_argument("--hours", type=int, default=4, help="consecutive hours billed (at least 2)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--concurrency", type=int, default=None, help="consumers (default: the template's cap)"
    )
    parser.add_argument(
        "--outage-seconds",
        type=float,
        default=Rates.outage_s,
        help="how long one marketplace is down each hour (the default dead-letters messages)",
    )
    parser.add_argument(
        "--marketplace-fault-rate",
        type=float,
        default=Rates.marketplace,
        help="the share of marketplace calls that fail (429, 500, 503, timeout, answer lost, reset alike)",
    )
    args = parser.parse_args(argv)
    if args.hours < 2 or args.customer_hours < args.hours * len(ALL):
        parser.error("need --hours >= 2 and at least one customer of each marketplace")
    customers = args.customer_hours // args.hours
    customer_hours = customers * args.hours

    os.environ.setdefault("XDG_RUNTIME_DIR", _runtime_dir())
    for name in ("elasticapm", "werkzeug", "aiohttp.access", "aiohttp.server"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from billing_local.stack import QueueSettings, embedded_postgres

    concurrency = args.concurrency or QueueSettings.from_template().max_concurrency
    rates = Rates(outage_s=args.outage_seconds, marketplace=args.marketplace_fault_rate)
    plan = SubscriberPlan.draw(customers, args.hours, args.seed, rates)
    print(
        f"chaos: {customers:,} customers x {args.hours} hours = {customer_hours:,} customer-hours, "
        f"{concurrency} consumers, seed {args.seed}",
        file=sys.stderr,
    )
    began = time.perf_counter()
    with embedded_postgres() as server:
        clean = bill_hours("clean", server, customers, args.hours, args.seed, None, concurrency, plan)
        print(f"  clean run: {clean.seconds:.1f} s, {clean.invocations:,} invocations", file=sys.stderr)
        chaos = bill_hours("chaos", server, customers, args.hours, args.seed, rates, concurrency, plan)
        print(
            f"  chaos run: {chaos.seconds:.1f} s, {chaos.invocations:,} invocations "
            f"({chaos.failed:,} failed), {chaos.redrive_rounds} redrive rounds",
            file=sys.stderr,
        )
    wall = time.perf_counter() - began
    verdict = compare(clean, chaos, customer_hours)
    injected = chaos.injected
    poison = len(chaos.poison)
    stranded = [body for body in chaos.dead_letters if body not in chaos.poison]

    print(f"customer-hours        {verdict.customer_hours:,}")
    print(f"double-billed         {verdict.double_billed}  (+{verdict.units_over} units)")
    print(f"lost                  {verdict.lost}  (-{verdict.units_under} units)")
    print(f"quantity difference   {verdict.quantity_difference}")
    print(f"wall time             {wall:.1f} s  (clean {clean.seconds:.1f} s, chaos {chaos.seconds:.1f} s)")
    during = sum(n for kind, n in injected.counts.items() if kind.startswith("cancelled mid-bill"))
    print(
        f"cancellations         {len(plan.cancels)} of {len(plan.marketplaces)} marketplace subscribers: "
        f"{during} during their customer's bill, {len(plan.cancels) - during} after the run "
        f"(clean run: {len(clean.ends)} before the run); held after an end: {len(verdict.after_end)}"
    )
    print("faults injected:")
    for kind, n in sorted(injected.counts.items()):
        print(f"  {kind:52} {n:,}")
    print(
        f"ledger: {len(verdict.ledger_disagreements)} disagreement(s) with the marketplaces, "
        f"{verdict.unsettled_rows} unsettled row(s); "
        f"dead-letter queue: {len(chaos.dead_letters)} message(s), "
        f"{len(stranded)} not poison ({poison} poison bodies sent; a poison message delivered twice leaves "
        f"two); unbilled after redrives: {len(chaos.unbilled_after)}"
    )
    unbilled = [f"unbilled: {line}" for line in chaos.unbilled_after]
    after_end = [f"held after the end: {line}" for line in verdict.after_end]
    problems = verdict.differences + verdict.hours_held_twice + verdict.ledger_disagreements + unbilled
    for line in problems + after_end + [f"cancellation not taken: {f}" for f in chaos.cancel_failures]:
        print(f"  ! {line}")
    # beyond the three figures: every customer-hour settled, the ledger agreeing with the marketplaces,
    # and nothing but poison left in the dead-letter queue
    ok = (
        verdict.ok
        and not chaos.unbilled_after
        and not verdict.ledger_disagreements
        and not verdict.unsettled_rows
        and not stranded
        and not verdict.after_end
        and len(clean.ends) == len(chaos.ends) == len(plan.cancels)
    )
    doc = {
        "benchmark": "chaos",
        "customer_hours": verdict.customer_hours,
        "customers": customers,
        "hours": args.hours,
        "seed": args.seed,
        "concurrency": concurrency,
        "double_billed": verdict.double_billed,
        "lost": verdict.lost,
        "quantity_difference": verdict.quantity_difference,
        "ok": ok,
        "wall_s": {
            "total": round(wall, 1),
            "clean": round(clean.seconds, 1),
            "chaos": round(chaos.seconds, 1),
        },
        "rates": dataclasses.asdict(rates),
        "injected": dict(sorted(injected.counts.items())),
        "clean_run": {"invocations": clean.invocations, "failed": clean.failed},
        "chaos_run": {
            "invocations": chaos.invocations,
            "failed": chaos.failed,
            "redrive_rounds": chaos.redrive_rounds,
            "redriven": chaos.redriven,
            "unbilled_after_redrives": chaos.unbilled_after[:20],
            "dead_letters": len(chaos.dead_letters),
            "dead_letters_not_poison": stranded[:20],
            "poison_bodies_sent": poison,
            "ledger_disagreements": verdict.ledger_disagreements,
            "unsettled_rows": verdict.unsettled_rows,
        },
        "cancellations": {
            "subscribers": len(plan.marketplaces),
            "planned": len(plan.cancels),
            "during_their_bill": during,
            "after_the_run": len(plan.cancels) - during,
            "clean_run": len(clean.ends),
            "held_after_end": verdict.after_end,
            "deliveries_not_taken": chaos.cancel_failures[:20],
        },
        "differences": verdict.differences,
        "hours_held_twice": verdict.hours_held_twice,
        "machine": machine(),
        "finished_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    path = write_json("chaos", doc)
    print(f"wrote {path}")
    return 0 if ok else 1


def _runtime_dir() -> str:
    path = Path.cwd() / ".run"
    path.mkdir(mode=0o700, exist_ok=True)
    return str(path)


if __name__ == "__main__":
    sys.exit(main())

"""1. Scheduling strategies: the same customers billed three ways, at the same cap.

Every strategy bills the same N customers with the project's per-customer code (``bill_body`` on one
shared ``Runtime``) against the local stack, the AWS marketplace emulator answering each call after a
latency of L on average (uniform in L ± jitter/2). Each customer is one APM transaction (the local
agent, events captured in memory) and the time spent inside ``bill_body`` is its own work time.

- sequential: an async generator pipeline (keyset pages of customers → messages → one bill at a time);
- semaphore: ``create_task`` for every customer behind ``asyncio.Semaphore(C)``, then ``gather``; the
  transaction begins when the task is created, which is what such code records;
- runner: the project's local runner (``drain``): C consumers fed by pollers from the SQS queue, the
  transaction beginning when a consumer picks the message up.

A heartbeat task sleeps 10 ms in a loop and records how late it wakes (event-loop lag).

Each run bills in a process of its own (bench.scheduling_child), as a biller does: the marketplace
emulators are threads of the bench's process, and their Python would hold the GIL the measured loop
needs. The loop's thread's wall time splits into its CPU, its wait for a core (Linux schedstat: two
cores shared with PostgreSQL, moto and the emulators) and its idleness (nothing ready to run).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import Section, at_most, median, percentile, summary

if TYPE_CHECKING:
    from bench.env import BenchStack

STRATEGIES = ("sequential", "semaphore", "runner")
SHIPPED_CUSTOMERS = 300
_USAGE_QUERY = re.compile(r"\bFROM usage\b")  # not usage_observations


@dataclass
class Params:
    customers: int
    cap: int
    latency_s: float
    jitter_s: float
    reps: int
    sequential_reps: int
    apm: bool = True

    @property
    def ideal(self) -> float:
        return math.ceil(self.customers / self.cap) * self.latency_s


@dataclass
class Run:
    strategy: str
    customers: int
    cap: int
    latency_s: float
    makespan: float  # from the first task (or drain's start) to the strategy's return
    last_done: float  # from the start to the last bill's end
    cpu_main: float  # CPU seconds of the event loop's thread
    # CPU seconds of the whole process: the loop's thread and any other (with ``child``, the strategy's
    # process: no emulator; else this one, whose emulator threads serve the marketplace calls)
    cpu_process: float
    failed: int
    ratios: list[float] = field(default_factory=list)  # transaction duration / own work, per customer
    works: list[float] = field(default_factory=list)  # seconds inside bill_body, per customer
    durations: list[float] = field(default_factory=list)  # recorded transaction durations
    lags: list[float] = field(default_factory=list)  # heartbeat lateness, seconds
    lag_at: list[float] = field(default_factory=list)  # when each heartbeat woke, seconds from the start
    gc_pauses: list[float] = field(default_factory=list)  # the cyclic collector's pauses, seconds
    spans: dict[str, list[int]] = field(default_factory=dict)  # kind -> count per transaction
    marketplace_calls: int = 0
    # seconds the loop's thread was ready to run but waited for a core (Linux schedstat; None elsewhere):
    # of the makespan, what is neither the loop's CPU nor its own idleness (waiting on I/O or the GIL)
    runqueue_wait: float | None = None
    # CPU seconds, over the same span, of the processes serving the run: PostgreSQL's, moto's and the
    # marketplace emulators' (the bench's process); measured when the strategy runs in a child of its own
    cpu_servers: float | None = None

    def brief(self) -> dict[str, Any]:
        doc = asdict(self)
        for key in ("ratios", "works", "durations", "lags", "gc_pauses"):
            doc[key] = summary(doc[key])
        worst = sorted(zip(self.lags, self.lag_at, strict=True), reverse=True)[:5]
        doc["lag_at"] = [{"lag_ms": round(lag * 1000, 1), "at_s": round(at, 3)} for lag, at in worst]
        doc["spans"] = {k: sorted(set(v)) for k, v in self.spans.items()}
        return doc


async def _heartbeat(lags: list[float], stop: asyncio.Event, at: list[float] | None = None) -> None:
    """Sleep 10 ms in a loop and record how late each wake-up is (Wellons' event-loop latency probe)."""
    while not stop.is_set():
        began = time.perf_counter()
        await asyncio.sleep(0.010)
        woke = time.perf_counter()
        lags.append(woke - began - 0.010)
        if at is not None:
            at.append(woke)


def _runqueue_wait() -> float | None:
    """Seconds this thread has spent runnable, waiting for a CPU (the second field of schedstat)."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


async def _server_processes(pool: Any) -> list[Any]:
    """The processes that serve this child's run: its parent (the marketplace emulators' threads), the
    parent's other children (moto's server), and PostgreSQL's (every process pg_stat_activity lists, and
    their postmaster)."""
    import psutil

    me = psutil.Process()
    parent = me.parent()
    found: dict[int, Any] = {}
    if parent is not None:
        found[parent.pid] = parent
        found.update({c.pid: c for c in parent.children() if c.pid != me.pid})
    for row in await pool.fetch("SELECT pid FROM pg_stat_activity"):
        with contextlib.suppress(psutil.Error):
            backend = psutil.Process(row["pid"])
            found[backend.pid] = backend
            postmaster = backend.parent()
            if postmaster is not None and postmaster.pid != 1:
                found[postmaster.pid] = postmaster
    return list(found.values())


def _cpu_of(processes: list[Any]) -> dict[int, float]:
    """Each live process's CPU seconds (user + system) so far."""
    import psutil

    seconds: dict[int, float] = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
    return seconds


def _cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two readings by the processes alive at both."""
    return sum(after[pid] - before[pid] for pid in before.keys() & after.keys())


def machine_cores() -> int:
    """The cores this process may run on (what the run's processes share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _sent(attributes: dict[str, Any]) -> int | None:
    sent = attributes.get("SentTimestamp")
    return int(sent) if sent else None


@contextlib.contextmanager
def _gc_pauses(pauses: list[float]) -> Any:
    """Record every pause of the cyclic garbage collector (a stall of the event loop like any other)."""
    began: list[float] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[:] = [time.perf_counter()]
        elif began:
            pauses.append(time.perf_counter() - began[0])

    gc.callbacks.append(callback)
    try:
        yield
    finally:
        gc.callbacks.remove(callback)


async def run_once(
    bench: BenchStack,
    strategy: str,
    template: str,
    p: Params,
    apm_client: Any = None,
    latency_s: float | None = None,
    child: bool = False,
) -> Run:
    """Bill ``p.customers`` customers of a fresh clone of ``template`` with one strategy.

    ``child``: the strategy runs in a process of its own (bench.scheduling_child), its own agent. This
    process serves the marketplace emulators from threads (bench.env.BenchStack.local), whose Python
    (~0.5 ms a BatchMeterUsage) holds the GIL an event loop here needs: a real marketplace is not in
    the biller's process. Else it runs here, with ``apm_client``.
    """
    latency = p.latency_s if latency_s is None else latency_s
    dsn = await bench.clone(template)
    queue_url = bench.new_queue()
    try:
        bench.forget_records()
        bench.marketplace_latency(latency, p.jitter_s if latency else 0.0)
        if child:
            run = await _in_child(strategy, p, dsn, queue_url, latency)
        else:
            run = await measure(strategy, p, dsn, queue_url, latency, apm_client if p.apm else None)
        run.marketplace_calls = bench.local.metering.calls
        return run
    finally:
        bench.delete_queue(queue_url)
        await bench.drop(dsn)


async def _in_child(strategy: str, p: Params, dsn: str, queue_url: str, latency: float) -> Run:
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.scheduling_child",
        json.dumps(
            {
                "strategy": strategy,
                "params": asdict(p),
                "dsn": dsn,
                "queue_url": queue_url,
                "latency": latency,
            }
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"scheduling_child {strategy} failed ({proc.returncode}): {err.decode()[-3000:]}")
    return Run(**json.loads(lines[-1]))


async def measure(
    strategy: str,
    p: Params,
    dsn: str,
    queue_url: str,
    latency: float,
    client: Any,
    servers: bool = False,
) -> Run:
    """Bill the customers of the database ``dsn`` with one strategy, in this process, timed and measured.

    ``client``: the APM agent (None: none), one transaction per customer. ``servers``: this process is
    a child of the bench's, which serves the emulators: the serving processes' CPU is measured too.
    """
    from pydantic import SecretStr

    from bench.env import bill_messages, last_hour
    from billing.adapters.postgres import PostgresDispatchRepository
    from billing.bootstrap import Runtime
    from billing.config import load_settings
    from billing.domain.messages import BillMessageV1
    from billing.entrypoints.biller import bill_body
    from billing_local.apm_capture import CAPTURE
    from billing_local.runner import Delivery, drain, lambda_like_transaction

    queue_name = queue_url.rsplit("/", 1)[-1]
    period = last_hour()
    settings = load_settings().model_copy(
        update={"db_pool_max": p.cap, "database_url": SecretStr(dsn), "queue_url": queue_url}
    )
    runtime = Runtime(settings)
    works: dict[str, float] = {}
    done_at: list[float] = []
    failed = 0

    async def work(body: str, message_id: str, sent: int | None) -> Any:
        began = time.perf_counter()
        try:
            return await bill_body(runtime, body, message_id, sent)
        finally:
            ended = time.perf_counter()
            works[json.loads(body)["customer_id"]] = ended - began
            done_at.append(ended)

    def delivery(message: BillMessageV1) -> Delivery:
        sent = str(int(time.time() * 1000))
        return Delivery(message.to_body(), str(uuid.uuid4()), "", 1, {"SentTimestamp": sent}, {})

    try:
        # warm the environment first, as a warm Lambda fleet would be: C extra customers billed at once
        # open the pool's C connections and the marketplace client's C HTTP connections, read the rate card
        warm = bill_messages(period, p.customers, p.cap)
        await asyncio.gather(*(bill_body(runtime, m.to_body(), str(uuid.uuid4())) for m in warm))
        sqs = None
        if strategy == "runner":
            sqs = await runtime.aws_client("sqs", max_pool_connections=p.cap + 10)
            await asyncio.gather(
                *(sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"]) for _ in range(p.cap))
            )
            dispatched = await runtime.dispatch({"period": period.isoformat()})
            assert dispatched.dispatched == p.customers, dispatched
        run_id = uuid.uuid4()
        repo = PostgresDispatchRepository(await runtime.pool())

        async def pipeline() -> Any:
            async for page in repo.customers_to_bill(period, 1000):
                for customer, _lane in page:
                    yield BillMessageV1(customer_id=customer, period=period.start, run_id=run_id)

        CAPTURE.reset()
        lags: list[float] = []
        lag_at: list[float] = []
        stop = asyncio.Event()
        beat = asyncio.create_task(_heartbeat(lags, stop, lag_at))
        await asyncio.sleep(0.05)  # the heartbeat's first beats, on an idle loop
        lags.clear()
        lag_at.clear()
        pauses: list[float] = []
        collecting = _gc_pauses(pauses)
        collecting.__enter__()
        serving = await _server_processes(await runtime.pool()) if servers else []
        serving_cpu = _cpu_of(serving)
        cpu_main, cpu_process, waited = time.thread_time(), time.process_time(), _runqueue_wait()
        started = time.perf_counter()
        if strategy == "sequential":
            async for message in pipeline():
                d = delivery(message)
                try:
                    with lambda_like_transaction(client, queue_name, d):
                        await work(d.body, d.message_id, _sent(d.attributes))
                except Exception:
                    failed += 1
            finished = time.perf_counter()
        elif strategy == "semaphore":
            slots = asyncio.Semaphore(p.cap)

            async def one(d: Delivery) -> None:
                nonlocal failed
                try:
                    # the transaction begins with the task: the wait for a slot is inside it
                    with lambda_like_transaction(client, queue_name, d):
                        async with slots:
                            await work(d.body, d.message_id, _sent(d.attributes))
                except Exception:
                    failed += 1

            tasks = [asyncio.create_task(one(delivery(m))) async for m in pipeline()]
            await asyncio.gather(*tasks)
            finished = time.perf_counter()
        elif strategy == "runner":
            stats = await drain(
                sqs,
                queue_url,
                lambda d: work(d.body, d.message_id, _sent(d.attributes)),
                p.cap,
                apm_client=client,
            )
            started, finished, failed = stats.started, stats.finished, stats.failed
        else:
            raise ValueError(strategy)
        cpu_main, cpu_process = time.thread_time() - cpu_main, time.process_time() - cpu_process
        waited_now = _runqueue_wait()
        runqueue_wait = waited_now - waited if waited is not None and waited_now is not None else None
        cpu_servers = _cpu_spent(serving_cpu, _cpu_of(serving)) if servers else None
        collecting.__exit__(None, None, None)
        stop.set()
        await beat
        if client is not None:
            client._transport.flush()
        run = Run(
            strategy=strategy,
            customers=p.customers,
            cap=p.cap,
            latency_s=latency,
            makespan=finished - started,
            last_done=(max(done_at) - started) if done_at else 0.0,
            cpu_main=cpu_main,
            cpu_process=cpu_process,
            failed=failed,
            works=list(works.values()),
            lags=lags,
            lag_at=[t - started for t in lag_at],
            gc_pauses=pauses,
            runqueue_wait=runqueue_wait,
            cpu_servers=cpu_servers,
        )
        if client is not None:
            _transactions(run, works)
        return run
    finally:
        await runtime.close()


def _transactions(run: Run, works: dict[str, float]) -> None:
    """Recorded durations from the captured APM events, each over its customer's own work time."""
    from billing_local.apm_capture import CAPTURE

    transactions = [t for t in CAPTURE.of_type("transaction") if t["type"] == "messaging"]
    spans_by_tx: dict[str, list[dict[str, Any]]] = {}
    for s in CAPTURE.of_type("span"):
        spans_by_tx.setdefault(s["transaction_id"], []).append(s)
    kinds: dict[str, list[int]] = {"sql": [], "usage_sql": [], "marketplace": [], "sqs": [], "other_exit": []}
    for t in transactions:
        customer = t.get("context", {}).get("tags", {}).get("customer_id")
        duration = t["duration"] / 1000
        run.durations.append(duration)
        if customer in works and works[customer] > 0:
            run.ratios.append(duration / works[customer])
        exits = [s for s in spans_by_tx.get(t["id"], []) if s.get("type") != "app"]
        sql = [s for s in exits if s.get("subtype") == "postgresql"]
        kinds["sql"].append(len(sql))
        kinds["usage_sql"].append(
            sum(
                1 for s in sql if _USAGE_QUERY.search(s.get("context", {}).get("db", {}).get("statement", ""))
            )
        )
        kinds["marketplace"].append(sum(1 for s in exits if s.get("subtype") == "marketplace metering"))
        kinds["sqs"].append(sum(1 for s in exits if s.get("subtype") == "sqs"))
        kinds["other_exit"].append(
            sum(1 for s in exits if s.get("subtype") not in ("postgresql", "marketplace metering", "sqs"))
        )
    run.spans = kinds


async def _all(bench: BenchStack, p: Params, apm_client: Any, log: Any) -> dict[str, list[Run]]:
    template = await bench.seeded_template("bench_sched", p.customers + p.cap)
    bench.subscribe(p.customers + p.cap)
    runs: dict[str, list[Run]] = {s: [] for s in STRATEGIES}
    for rep in range(p.reps):
        # interleaved, so a noisy moment of the machine hits every strategy alike
        for strategy in STRATEGIES:
            if strategy == "sequential" and rep >= p.sequential_reps:
                continue
            run = await run_once(bench, strategy, template, p, child=True)
            runs[strategy].append(run)
            log(
                f"  {strategy:<10} rep {rep + 1}: makespan {run.makespan:.2f} s "
                f"(last bill done at {run.last_done:.2f} s), duration ratio p99 "
                f"{_fmt(percentile(run.ratios, 99))}, heartbeat lag p99 "
                f"{_fmt(_ms(percentile(run.lags, 99)))} ms, "
                f"loop CPU {run.cpu_main:.2f} s, process CPU {run.cpu_process:.2f} s, loop waiting for a "
                f"core {_fmt(run.runqueue_wait)} s, failed {run.failed}"
            )
    return runs


async def _moto_receive_cost(bench: BenchStack, depths: list[int], log: Any) -> dict[str, Any]:
    """How long moto's server takes for one SendMessageBatch and one ReceiveMessage of 10 at a queue depth."""
    import aioboto3
    from botocore.config import Config

    out: dict[str, Any] = {}
    for depth in depths:
        url = bench.new_queue("depth")
        async with aioboto3.Session().client(
            "sqs", endpoint_url=bench.local.moto_url, config=Config(max_pool_connections=10)
        ) as sqs:
            todo = iter(range(0, depth, 10))

            async def sender(client: Any = sqs, queue: str = url, todo: Any = todo) -> None:
                for start in todo:
                    await client.send_message_batch(
                        QueueUrl=queue,
                        Entries=[{"Id": str(i), "MessageBody": f"m{start + i}"} for i in range(10)],
                    )

            await asyncio.gather(*(sender() for _ in range(8)))
            calls = 10
            began = time.perf_counter()
            for _ in range(calls):
                await sqs.send_message_batch(
                    QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": "m"} for i in range(10)]
                )
            send_ms = (time.perf_counter() - began) / calls * 1000
            began = time.perf_counter()
            for _ in range(calls):
                await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
            receive_ms = (time.perf_counter() - began) / calls * 1000
        bench.delete_queue(url)
        out[str(depth)] = {"ms_per_send_batch_of_10": send_ms, "ms_per_receive_of_10": receive_ms}
        log(
            f"  moto at queue depth {depth}: SendMessageBatch(10) {send_ms:.1f} ms, "
            f"ReceiveMessage(10) {receive_ms:.1f} ms"
        )
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def run(bench: BenchStack, p: Params, apm_client: Any, log: Any, diagnose: bool = True) -> Section:
    section = Section("scheduling", "1 scheduling")
    log(
        f"1. scheduling: N={p.customers} customers, cap C={p.cap}, marketplace latency "
        f"L={p.latency_s * 1000:.0f} ms "
        f"± {p.jitter_s * 500:.0f} ms, {p.reps} repetition(s) ({p.sequential_reps} for sequential)"
    )
    with bench.linear_moto():
        runs = asyncio.run(_all(bench, p, apm_client, log))
        depths = sorted({100, p.customers // 4, p.customers})
        moto_cost = asyncio.run(_moto_receive_cost(bench, depths, log)) if diagnose else {}
    shipped: Run | None = None
    shipped_cost: dict[str, Any] = {}
    if diagnose:
        # as shipped, moto's SQS costs O(queue depth) per message: at N=2,000 one run would take most of
        # an hour, so this one bills at most SHIPPED_CUSTOMERS
        small = Params(**{**asdict(p), "customers": min(p.customers, SHIPPED_CUSTOMERS)})
        log(f"  the runner once more, on moto as shipped (no fixes), N={small.customers}:")

        async def as_shipped() -> Run:
            template = await bench.seeded_template("bench_sched_shipped", small.customers + small.cap)
            return await run_once(bench, "runner", template, small, child=True)

        with bench.linear_moto("moto.server"):
            shipped = asyncio.run(as_shipped())
            log(
                f"  runner (moto as shipped): makespan {shipped.makespan:.2f} s, last bill done at "
                f"{shipped.last_done:.2f} s, loop CPU {shipped.cpu_main:.2f} s, process CPU "
                f"{shipped.cpu_process:.2f} s"
            )
            shipped_cost = asyncio.run(_moto_receive_cost(bench, [100, 500, 1000], log))
    section.note(
        "SQS for these runs: moto 5.2.5's server in a process of its own, as the local stack runs it, with "
        "billing_local/moto_fixes.py's fixes (as shipped, moto spends O(queue depth) per message sent, "
        "received or deleted, and can lose a message under concurrent DeleteMessage); the runner on moto as "
        "shipped is one extra run, below. Each strategy bills in a process of its own "
        "(bench/scheduling_child.py): the marketplace emulators are threads of the bench's process, and a "
        "real marketplace is not in the biller's."
    )

    seq = runs["sequential"]
    own_work = median([median(r.works) or 0.0 for r in seq]) or 0.0
    # the least event-loop CPU one customer cost in any strategy of this run: every strategy runs its
    # bills on one event loop, so none can finish N customers in less than N times that
    cpu_loop_per_customer = min(median([r.cpu_main / r.customers for r in rs]) or 0.0 for rs in runs.values())
    rounds = math.ceil(p.customers / p.cap)
    bound_latency = rounds * own_work
    bound_cpu = p.customers * cpu_loop_per_customer
    lower_bound = max(bound_latency, bound_cpu)
    # the machine's CPU bound for the runner's runs: what the run's processes spent (the runner's, and
    # PostgreSQL's, moto's and the emulators' serving it) shared out over the machine's cores; no
    # schedule on this machine finishes sooner (None when the runs were measured in this process)
    cores = machine_cores()
    machine_bounds = [
        (r.cpu_process + r.cpu_servers) / cores for r in runs["runner"] if r.cpu_servers is not None
    ]
    bound_machine = median(machine_bounds) if machine_bounds else None
    # the target: the ideal latency bound or the measured CPU bound per core, the larger of one
    # core's worth of the loop's CPU and the run's CPU over the machine's cores (each a lower bound)
    bound_loop_target = max(p.ideal, bound_cpu)
    target_bound = max(bound_loop_target, bound_machine or 0.0)
    # the runner's own CPU bound: N × the runner's own loop CPU per customer (its SQS receive and delete
    # included, which Lambda's poller does outside the function): reported beside, not the target's
    runner_cpu_per_customer = median([r.cpu_main / r.customers for r in runs["runner"]]) or 0.0
    runner_bound_cpu = p.customers * runner_cpu_per_customer
    section.note(
        f"ideal = ceil(N/C) × L = {rounds} × {p.latency_s * 1000:.0f} ms = {p.ideal:.2f} s counts the "
        "marketplace "
        "latency alone and ignores each customer's SQL round trips, SQS calls and CPU."
    )
    section.note(
        "measured lower bound = max(ceil(N/C) × one customer's own work when billed alone "
        f"({own_work * 1000:.1f} ms, "
        f"median of the sequential run) = {bound_latency:.2f} s, N × the least event-loop CPU a customer "
        "cost in "
        f"any strategy ({cpu_loop_per_customer * 1000:.2f} ms) = {bound_cpu:.2f} s) = {lower_bound:.2f} s: "
        "all "
        "of a strategy's bills run on one event loop, one thread."
    )

    per: dict[str, dict[str, Any]] = {}
    for strategy in STRATEGIES:
        rs = runs[strategy]
        makespan = median([r.makespan for r in rs])
        per[strategy] = {
            "makespan_s": makespan,
            "last_done_s": median([r.last_done for r in rs]),
            "makespan_over_ideal": makespan / p.ideal if makespan and p.ideal else None,
            "makespan_over_lower_bound": makespan / lower_bound if makespan and lower_bound else None,
            "makespan_over_target_bound": makespan / target_bound if makespan and target_bound else None,
            "ratio_p50": median([percentile(r.ratios, 50) for r in rs]),
            "ratio_p99": median([percentile(r.ratios, 99) for r in rs]),
            "ratio_max": median([max(r.ratios) if r.ratios else None for r in rs]),
            "lag_p50_ms": _ms(median([percentile(r.lags, 50) for r in rs])),
            "lag_p99_ms": _ms(median([percentile(r.lags, 99) for r in rs])),
            "lag_max_ms": _ms(median([max(r.lags) if r.lags else None for r in rs])),
            "gc_max_ms": _ms(median([max(r.gc_pauses) if r.gc_pauses else 0.0 for r in rs])),
            "cpu_loop_per_customer_ms": _ms(median([r.cpu_main / r.customers for r in rs])),
            "cpu_process_per_customer_ms": _ms(median([r.cpu_process / r.customers for r in rs])),
            "loop_busy": median([r.cpu_main / r.makespan for r in rs]),
            "cpu_loop_s": median([r.cpu_main for r in rs]),
            "runqueue_wait_s": median([r.runqueue_wait for r in rs if r.runqueue_wait is not None]),
            # per run, then the median: the loop neither running nor waiting for a core
            "idle_s": median(
                [r.makespan - r.cpu_main - r.runqueue_wait for r in rs if r.runqueue_wait is not None]
            ),
            "runqueue_share": median(
                [r.runqueue_wait / r.makespan for r in rs if r.runqueue_wait is not None]
            ),
            "idle_share": median(
                [
                    (r.makespan - r.cpu_main - r.runqueue_wait) / r.makespan
                    for r in rs
                    if r.runqueue_wait is not None
                ]
            ),
            # event loops (cores) needed to bill N customers within 1.10 × ideal at this CPU per customer
            "cores_needed": median([r.cpu_main / (1.10 * p.ideal) for r in rs]),
            "failed": sum(r.failed for r in rs),
            "duplicates": sum(max(0, len(r.durations) - r.customers) for r in rs),
            "repetitions": len(rs),
        }

    for strategy in STRATEGIES:
        f = per[strategy]
        is_runner = strategy == "runner"
        reps = f"median of {f['repetitions']}"
        section.add(
            f"{strategy}: makespan",
            f["makespan_s"],
            "s",
            f"ideal {p.ideal:.2f} s",
            None,
            reps,
        )
        section.add(f"{strategy}: makespan / ideal ceil(N/C)×L", f["makespan_over_ideal"], "×", "", None)
        if is_runner:
            machine = ""
            if bound_machine is not None:
                machine = f", the run's CPU over {cores} cores {bound_machine:.2f} s"
            section.add(
                f"{strategy}: makespan / max(ideal, CPU bound per core)",
                f["makespan_over_target_bound"],
                "×",
                f"≤ 1.10 (bound {target_bound:.2f} s: ideal {p.ideal:.2f} s, loop CPU {bound_cpu:.2f} s"
                f"{machine})",
                at_most(f["makespan_over_target_bound"], 1.10),
                _makespan_reason(f, p, lower_bound, cpu_loop_per_customer, shipped, shipped_cost)
                if (f["makespan_over_target_bound"] or 0) > 1.10
                else "",
            )
            section.add(
                f"{strategy}: makespan / max(ideal, one core's loop CPU)",
                f["makespan_s"] / bound_loop_target if f["makespan_s"] and bound_loop_target else None,
                "×",
                f"(bound {bound_loop_target:.2f} s: N × the least loop CPU per customer of any strategy)",
                None,
                "as if the loop had a core to itself: the servers' share of the cores not counted",
            )
            if bound_machine is not None:
                serving = median([r.cpu_servers for r in runs["runner"] if r.cpu_servers is not None])
                section.add(
                    f"{strategy}: CPU spent by the run / the machine's cores",
                    bound_machine,
                    "s",
                    "",
                    None,
                    f"the runner's process {median([r.cpu_process for r in runs['runner']]):.2f} s + "
                    f"PostgreSQL, moto and the emulators {serving:.2f} s, over {cores} cores",
                )
            own_bound = max(p.ideal, runner_bound_cpu)
            section.add(
                f"{strategy}: makespan / max(ideal, its own CPU bound)",
                f["makespan_s"] / own_bound if f["makespan_s"] and own_bound else None,
                "×",
                f"(bound {own_bound:.2f} s: N × the runner's own {runner_cpu_per_customer * 1000:.2f} ms)",
                None,
                "how idle its loop is, not what it costs beyond the bill's own work",
            )
        section.add(
            f"{strategy}: makespan / measured lower bound",
            f["makespan_over_lower_bound"],
            "×",
            f"LB {lower_bound:.2f} s",
            None,
        )
        for q in ("p50", "p99", "max"):
            value = f[f"ratio_{q}"]
            if is_runner and q == "p99":
                section.add(
                    f"{strategy}: transaction duration / own work {q}",
                    value,
                    "×",
                    "≤ 1.05",
                    at_most(value, 1.05),
                    "the transaction also covers the agent's begin/end and the runner's bookkeeping",
                )
            else:
                target = (
                    f"≈ N/C = {p.customers / p.cap:.0f} expected"
                    if strategy == "semaphore" and q == "max"
                    else ""
                )
                section.add(f"{strategy}: transaction duration / own work {q}", value, "×", target, None)
        section.add(
            f"{strategy}: event-loop CPU per customer",
            f["cpu_loop_per_customer_ms"],
            "ms",
            "",
            None,
            f"loop busy {f['loop_busy'] * 100:.0f}% of the makespan"
            + (
                f", waiting for a core {f['runqueue_share'] * 100:.0f}%, idle {f['idle_share'] * 100:.0f}%"
                if f["runqueue_share"] is not None
                else ""
            )
            + f"; {f['cores_needed']:.1f} cores' worth of loops would reach 1.10 × ideal",
        )
        section.add(
            f"{strategy}: heartbeat lag p99",
            f["lag_p99_ms"],
            "ms",
            "< 50 ms" if is_runner else "",
            (f["lag_p99_ms"] < 50 if f["lag_p99_ms"] is not None else None) if is_runner else None,
            _lag_reason(f, p) if f["lag_max_ms"] is not None else "",
        )
        if is_runner:
            section.add(
                "runner: drain returns after the last bill by",
                f["makespan_s"] - f["last_done_s"],
                "s",
                "",
                None,
                "the pollers notice the empty queue when their long poll (1 s) ends",
            )
            section.add(
                "runner: messages delivered more than once",
                f["duplicates"],
                "",
                "",
                None,
                f"over {f['repetitions']} run(s); billed once each (the ledger), but each is one more "
                "transaction",
            )
    if shipped is not None:
        ideal_small = math.ceil(shipped.customers / p.cap) * p.latency_s
        section.add(
            f"runner on moto as shipped (N={shipped.customers}): makespan",
            shipped.makespan,
            "s",
            f"ideal {ideal_small:.2f} s",
            None,
            f"{shipped.makespan / ideal_small:.1f}× ideal; last bill done at {shipped.last_done:.2f} s; 1 "
            "run",
        )
    section.raw = {
        "params": asdict(p) | {"ideal_s": p.ideal},
        "runner_moto_as_shipped": shipped.brief() if shipped else None,
        "moto_receive_cost_as_shipped": shipped_cost,
        "lower_bound_s": lower_bound,
        "target_bound_s": target_bound,
        "ideal_s": p.ideal,
        "cpu_bound_s": bound_cpu,
        "machine_cpu_bound_s": bound_machine,
        "cores": cores,
        "runner_own_cpu_bound_s": runner_bound_cpu,
        "lower_bound_terms": {
            "latency_term_s": bound_latency,
            "cpu_term_s": bound_cpu,
            "own_work_alone_ms": own_work * 1000,
            "cpu_loop_per_customer_least_ms": cpu_loop_per_customer * 1000,
        },
        "per_strategy": per,
        "runs": {s: [r.brief() for r in rs] for s, rs in runs.items()},
        "moto_receive_cost": moto_cost,
    }
    return section


def _lag_reason(f: dict[str, Any], p: Params) -> str:
    text = f"max {f['lag_max_ms']:.0f} ms; garbage-collector pauses up to {f['gc_max_ms']:.0f} ms"
    if f["lag_p99_ms"] is not None and f["lag_p99_ms"] >= 50:
        text += (
            f"; the loop is busy {f['loop_busy'] * 100:.0f}% of the time with {p.cap} bills of "
            f"{f['cpu_loop_per_customer_ms']:.1f} ms CPU each in flight, so a wake-up waits behind the "
            "callbacks ready before it"
        )
    return text


def _makespan_reason(
    f: dict[str, Any],
    p: Params,
    lower_bound: float,
    cpu_per_customer: float,
    shipped: Run | None,
    shipped_cost: dict[str, Any],
) -> str:
    if f["makespan_over_ideal"] is None or f["makespan_over_ideal"] <= 1.10:
        return ""
    parts = [
        f"the measured lower bound alone is {lower_bound / p.ideal:.1f}× ideal: at least "
        f"{cpu_per_customer * 1000:.1f} ms of event-loop CPU per customer (the runner spends "
        f"{f['cpu_loop_per_customer_ms']:.1f} ms) × N = {p.customers} on one core",
        f"to finish within 1.10 × ideal at that cost the bills need {f['cores_needed']:.1f} cores' worth of "
        "event "
        "loops",
        f"its loop is busy {f['loop_busy'] * 100:.0f}% of the makespan",
    ]
    if f["runqueue_wait_s"] is not None:
        parts.append(
            f"of the makespan ({f['makespan_s']:.2f} s) the loop ran {f['cpu_loop_s']:.2f} s, waited for a "
            f"core {f['runqueue_wait_s']:.2f} s (schedstat: the machine's cores are shared with PostgreSQL, "
            f"moto, the emulators, whatever else runs) and was idle {f['idle_s']:.2f} s (medians of the runs)"
        )
    tail = f["makespan_s"] - f["last_done_s"]
    if tail > 0.05:
        parts.append(f"{tail:.2f} s after the last bill until drain returns (the poller's 1 s long poll)")
    if shipped is not None:
        parts.append(
            f"on moto as shipped the runner takes {shipped.makespan:.1f} s for {shipped.customers} customers"
        )
    if shipped_cost:
        deepest = max(shipped_cost, key=int)
        parts.append(
            f"(moto as shipped: ReceiveMessage(10) {shipped_cost[deepest]['ms_per_receive_of_10']:.0f} ms "
            "and "
            f"SendMessageBatch(10) {shipped_cost[deepest]['ms_per_send_batch_of_10']:.0f} ms at depth "
            f"{deepest})"
        )
    if f.get("duplicates"):
        parts.append(f"{f['duplicates']} message(s) delivered twice")
    return "; ".join(parts)

"""The runner and the bare I/O floor in a process of their own, their event-loop CPU measured and sampled.

Run by bench.profile as ``python -m bench.profile_child``; prints one JSON document. The parent holds
the local stack (PostgreSQL, moto, the marketplace emulator) and fills the queues; this process runs
only the event loop, so the process-CPU timer the sampler uses is, within a few percent, that loop's.

- floor: what billing a customer cannot do without, and nothing else: its share of a ReceiveMessage
  and a DeleteMessageBatch (10 messages each), four asyncpg round trips, one BatchMeterUsage with the
  customer's three records; C workers, no agent, no project code.
- runner: the project's local runner (``drain``) billing the same number of customers with
  ``bill_body``, C consumers; with the agent as template.yaml configures it, or without any agent (a
  process where ``elasticapm.instrument()`` never ran).
- sampled: the runner once more, with a SIGPROF sampler (every millisecond of process CPU) attributing
  each sample to a component by the module of the code running (below).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import signal
import sys
import sysconfig
import time
from collections import Counter
from typing import Any

# Components by top-level module. A sample in the standard library counts for the nearest caller
# outside it (json called by the agent is the agent's), except asyncio, the event loop itself.
COMPONENTS: dict[str, str] = {
    "elasticapm": "APM agent",
    "botocore": "botocore",
    "aiobotocore": "botocore",
    "boto3": "botocore",
    "aioboto3": "botocore",
    "jmespath": "botocore",
    "dateutil": "botocore",
    "aiohttp": "aiohttp",
    "yarl": "aiohttp",
    "multidict": "aiohttp",
    "aiohappyeyeballs": "aiohttp",
    "propcache": "aiohttp",
    "frozenlist": "aiohttp",
    "aiosignal": "aiohttp",
    "asyncpg": "asyncpg",
    "asyncio": "asyncio",
    "selectors": "asyncio",
    "billing": "project",
    "billing_local": "project",
    "bench": "project",
}
STDLIB = sysconfig.get_paths()["stdlib"]
GC = "GC"
OTHER = "other libraries"


class Sampler:
    """SIGPROF every ``interval_s`` of process CPU; each sample counted for the component running.

    Cython and C code makes no Python frame: a sample taken there is handled at the next Python
    frame. asyncpg's protocol is Cython called straight by the event loop, so a sample landing in
    asyncio's ``Handle._run`` or a transport's read callback is counted for the callback's or the
    protocol's owner. A sample during a collection is handled in the collector's stop callback: GC.
    """

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.samples: Counter[str] = Counter()
        self.modules: Counter[str] = Counter()  # "other libraries" by top-level module
        self.functions: Counter[str] = Counter()  # "component: module.function" of each sample
        self._codes: dict[Any, str | None] = {}
        self.in_gc = False
        self.where = ""

    def _component_of_code(self, frame: Any) -> str | None:
        code = frame.f_code
        known = self._codes.get(code, "?")
        if known != "?":
            return known
        name = frame.f_globals.get("__name__", "") or ""
        top = name.split(".", 1)[0]
        component: str | None
        if top in COMPONENTS:
            component = COMPONENTS[top]
        elif code.co_filename.startswith(STDLIB) and "site-packages" not in code.co_filename:
            component = None  # the caller's
        else:
            component = f"{OTHER}:{top}"
        self._codes[code] = component
        return component

    @staticmethod
    def _owner(obj: Any) -> str | None:
        module = getattr(type(obj), "__module__", "") or ""
        component = COMPONENTS.get(module.split(".", 1)[0])
        return component if component not in (None, "asyncio") else None

    def classify(self, frame: Any) -> str:
        if self.in_gc:
            return GC
        self.where = ""
        leaf = True
        while frame is not None:
            component = self._component_of_code(frame)
            if component == "asyncio" and leaf:
                owner = frame.f_locals.get("self")
                callback = getattr(owner, "_callback", None)
                target = getattr(callback, "__self__", None) if callback is not None else None
                by = self._owner(target) if target is not None else None
                if by is None and callback is not None and getattr(callback, "__module__", None):
                    by = COMPONENTS.get(str(callback.__module__).split(".", 1)[0])
                    by = by if by != "asyncio" else None
                if by is None:
                    by = self._owner(getattr(owner, "_protocol", None))
                return by or "asyncio"
            if component is not None:
                self.where = f"{frame.f_globals.get('__name__', '')}.{frame.f_code.co_qualname}"
                return component
            leaf = False
            frame = frame.f_back
        return f"{OTHER}:?"

    def _handler(self, _signum: int, frame: Any) -> None:
        kind = self.classify(frame)
        self.functions[f"{kind}: {self.where}"] += 1
        if kind.startswith(OTHER):
            self.modules[kind.split(":", 1)[1]] += 1
            kind = OTHER
        self.samples[kind] += 1

    def __enter__(self) -> Sampler:
        signal.signal(signal.SIGPROF, self._handler)
        signal.setitimer(signal.ITIMER_PROF, self.interval_s, self.interval_s)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, signal.SIG_DFL)


class GcMeter:
    """The cyclic collector's CPU (this thread) and its collections by generation."""

    def __init__(self, sampler: Sampler | None = None) -> None:
        self.cpu_s = 0.0
        self.collections: Counter[int] = Counter()
        self._began = 0.0
        self._sampler = sampler

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.thread_time()
            if self._sampler is not None:
                self._sampler.in_gc = True
        else:
            self.cpu_s += time.thread_time() - self._began
            self.collections[int(info["generation"])] += 1
            if self._sampler is not None:
                self._sampler.in_gc = False

    def __enter__(self) -> GcMeter:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


async def _floor(runtime: Any, queue_url: str, n: int, cap: int, product: str) -> dict[str, Any]:
    """The bare I/O of ``n`` bills at concurrency ``cap``; event-loop CPU and wall time.

    Each message's body is an AWS customer identifier, subscribed to ``product``.
    """
    from bench.env import last_hour, rate_card

    pool = await runtime.pool()
    sqs = await runtime.aws_client("sqs", max_pool_connections=cap + 10)
    metering = await runtime.aws_client("meteringmarketplace", max_pool_connections=max(10, cap))
    period = last_hour()
    dimensions = [d for _m, _metric, d, _f in rate_card(3)]
    inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    finished: asyncio.Queue[str] = asyncio.Queue()

    async def receiver() -> None:
        got = 0
        while got < n:
            response = await sqs.receive_message(
                QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
            )
            for m in response.get("Messages", []):
                inbox.put_nowait(m)
                got += 1
        for _ in range(cap):
            inbox.put_nowait(None)

    async def worker() -> None:
        while (m := await inbox.get()) is not None:
            async with pool.acquire() as conn:
                for _ in range(4):
                    await conn.fetchval("SELECT $1::text", m["MessageId"])
            await metering.batch_meter_usage(
                ProductCode=product,
                UsageRecords=[
                    {
                        "Timestamp": period.start,
                        "Dimension": d,
                        "Quantity": 1,
                        "CustomerIdentifier": m["Body"],
                    }
                    for d in dimensions
                ],
            )
            finished.put_nowait(m["ReceiptHandle"])

    async def deleter() -> None:
        deleted = 0
        while deleted < n:
            handles = [await finished.get()]
            while len(handles) < 10 and not finished.empty():
                handles.append(finished.get_nowait())
            entries = [{"Id": str(k), "ReceiptHandle": h} for k, h in enumerate(handles)]
            await sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
            deleted += len(handles)

    cpu, began = time.thread_time(), time.perf_counter()
    await asyncio.gather(receiver(), deleter(), *(worker() for _ in range(cap)))
    return {"cpu_loop_s": time.thread_time() - cpu, "wall_s": time.perf_counter() - began, "customers": n}


async def _runner(
    runtime: Any, queue_url: str, cap: int, apm_client: Any, sampler: Sampler | None
) -> dict[str, Any]:
    from billing.entrypoints.biller import bill_body
    from billing_local.runner import drain

    sqs = await runtime.aws_client("sqs", max_pool_connections=cap + 10)
    meter = GcMeter(sampler)
    cpu, process = time.thread_time(), time.process_time()
    sampling = sampler if sampler is not None else contextlib.nullcontext()
    with meter, sampling:
        stats = await drain(
            sqs, queue_url, lambda d: bill_body(runtime, d.body, d.message_id), cap, apm_client=apm_client
        )
    if apm_client is not None:
        apm_client._transport.flush()
    return {
        "cpu_loop_s": time.thread_time() - cpu,
        "cpu_process_s": time.process_time() - process,
        "makespan_s": stats.makespan,
        "customers": stats.succeeded,
        "failed": stats.failed,
        "gc_cpu_s": meter.cpu_s,
        "gc_collections": {str(g): meter.collections[g] for g in (0, 1, 2)},
    }


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    from bench.env import bill_messages, last_hour
    from billing.bootstrap import Runtime
    from billing.config import load_settings
    from billing.entrypoints.biller import bill_body

    apm_client = None
    if args.apm == "on":
        from billing_local.apm_capture import CAPTURE
        from billing_local.local_run import local_apm_client

        apm_client = local_apm_client()
    runtime = Runtime(load_settings().model_copy(update={"db_pool_max": args.cap}))
    doc: dict[str, Any] = {"apm": args.apm, "cap": args.cap}
    try:
        # warm, as a warm fleet is: C customers at once open the pool's and the HTTP clients' connections
        warm = bill_messages(last_hour(), args.warm_first, args.cap)
        await asyncio.gather(*(bill_body(runtime, m.to_body(), f"warm-{i}") for i, m in enumerate(warm)))
        queues = args.queues.split(",")
        if args.floor_queues:
            (warm_queue, queue), (warm_n, n) = args.floor_queues.split(","), args.floor_counts
            await _floor(runtime, warm_queue, warm_n, args.cap, args.product)  # opens its connections
            doc["floor"] = await _floor(runtime, queue, n, args.cap, args.product)
        runs = []
        for k, queue in enumerate(queues):
            sampler = Sampler() if args.sample and k == len(queues) - 1 else None
            if apm_client is not None:
                CAPTURE.reset()
            run = await _runner(runtime, queue, args.cap, apm_client, sampler)
            if sampler is not None:
                run["samples"] = dict(sampler.samples)
                run["other_modules"] = dict(sampler.modules.most_common(8))
                run["functions"] = dict(sampler.functions.most_common(60))
            runs.append(run)
        doc["runs"] = runs
    finally:
        await runtime.close()
    return doc


def main() -> None:
    from billing.collector import settle_after_init

    parser = argparse.ArgumentParser()
    parser.add_argument("--apm", choices=("on", "off"), required=True)
    parser.add_argument("--cap", type=int, required=True)
    parser.add_argument("--queues", required=True, help="runner queues, one run each, filled by the parent")
    parser.add_argument("--sample", action="store_true", help="sample the last run")
    parser.add_argument("--warm-first", type=int, required=True, help="first customer index of the warm-up")
    parser.add_argument("--floor-queues", default="", help="the floor's warm-up and measured queues")
    parser.add_argument("--floor-counts", type=int, nargs=2, default=(0, 0), help="their message counts")
    parser.add_argument("--product", default="")
    args = parser.parse_args()
    settle_after_init()  # as the handlers and the runner do after their init
    print(json.dumps(asyncio.run(_main(args))))


if __name__ == "__main__":
    sys.exit(main())

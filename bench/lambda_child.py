"""One Lambda execution environment, in a fresh process: import the biller, invoke it warm many times.

Run by bench.cost as ``python -m bench.lambda_child``: the parent holds the local stack and passes its
endpoints in the environment. Prints one JSON document. The handler is invoked in-process exactly as
the Lambda runtime invokes it (``lambda_handler(event, context)`` with a one-record SQS event), so its
asyncpg pool and HTTP sessions live on the module's loop across invocations.

``BENCH_LAMBDA_PROFILE=PATH`` (in the parent's environment) profiles the warm invocations with
cProfile, in the handler's thread only, to ``PATH.on``, ``PATH.off`` or ``PATH.on-unregistered``;
``BENCH_LAMBDA_SAMPLE=PATH`` samples them (bench.profile_child.Sampler, every 0.5 ms of CPU) into
the same names, as JSON: samples by component and the most sampled functions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HEAVY = (
    "elasticsearch",
    "elastic_transport",
    "google.auth",
    "google.oauth2",
    "azure.identity",
    "azure.core",
    "msal",
    "requests",
    "urllib3",
    "httpx",
    "boto3",
    "botocore",
    "aiobotocore",
    "aioboto3",
    "aiohttp",
    "asyncpg",
    "elasticapm",
    "aws_lambda_powertools",
    "pydantic",
    "cryptography",
    "jinja2",
    "graphql",
    "moto",
    "billing_local",
)


def heavy_loaded() -> list[str]:
    return [m for m in HEAVY if m in sys.modules]


def rss_mb() -> float:
    with Path("/proc/self/statm").open() as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec, so a child of
    a large parent would start at the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--period", required=True)
    parser.add_argument("--invocations", type=int, default=1000)
    parser.add_argument("--first", type=int, default=0, help="index of the first AWS customer to bill")
    parser.add_argument("--marketplace-customers", default="", help="gcp and azure customer ids, billed last")
    parser.add_argument("--memory-after", type=int, default=10)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "functions" / "biller"))
    from bench.lambda_events import LambdaContext, customer_id, lambda_event

    doc: dict[str, Any] = {"rss_mb_before_import": rss_mb()}
    began = time.perf_counter()
    import biller

    doc["import_s"] = time.perf_counter() - began
    doc["heavy_after_import"] = heavy_loaded()
    doc["rss_mb_after_import"] = rss_mb()

    import uuid

    from billing.domain.messages import BillMessageV1
    from billing.domain.model import Period
    from billing.entrypoints.loop import LOOP
    from billing_local.apm_capture import CAPTURE

    opened = {"tcp": 0, "unix": 0}
    for kind, name in (("tcp", "create_connection"), ("unix", "create_unix_connection")):
        original = getattr(LOOP, name)

        def counting(*a: Any, _original: Any = original, _kind: str = kind, **kw: Any) -> Any:
            opened[_kind] += 1
            return _original(*a, **kw)

        setattr(LOOP, name, counting)

    period = Period(datetime.fromisoformat(args.period))
    run_id = uuid.uuid4()

    def event_for(customer: str) -> dict[str, Any]:
        body = BillMessageV1(customer_id=customer, period=period.start, run_id=run_id).to_body()
        return lambda_event(body)

    async def backends() -> list[tuple[int, str]]:
        pool = await biller.runtime.pool()
        rows = await pool.fetch(
            "SELECT pid, backend_start::text AS started FROM pg_stat_activity"
            " WHERE application_name = 'marketplace-billing' AND datname = current_database()"
        )
        return sorted((r["pid"], r["started"]) for r in rows)

    durations: list[float] = []
    cpu: list[float] = []
    failures = 0
    connections: list[int] = []
    memory: dict[str, Any] = {}
    pg_first: list[tuple[int, str]] = []
    profile_to = os.environ.get("BENCH_LAMBDA_PROFILE")
    profiler = None
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
    sample_to = os.environ.get("BENCH_LAMBDA_SAMPLE")
    sampler = None
    if sample_to:
        from bench.profile_child import Sampler

        sampler = Sampler(interval_s=0.0005)
    for i in range(args.invocations):
        if profiler is not None and i == 1:
            profiler.enable()
        if sampler is not None and i == 1:
            sampler.__enter__()
        event = event_for(customer_id(args.first + i))
        before = opened["tcp"] + opened["unix"]
        t0, c0 = time.perf_counter(), time.process_time()
        response = biller.lambda_handler(event, LambdaContext.of())
        durations.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # the agent's sender thread included, as Lambda bills it
        connections.append(opened["tcp"] + opened["unix"] - before)
        failures += len(response.get("batchItemFailures", []))
        CAPTURE.reset()  # the events would have gone to the APM extension; do not keep them here
        if i == 0:
            pg_first = LOOP.run_until_complete(backends())
            doc["heavy_after_first_bill"] = heavy_loaded()
        if i + 1 == args.memory_after:
            gc.collect()
            memory["after_small"] = {"n": i + 1, "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb()}
    label = "on" if os.environ.get("ELASTIC_APM_ENABLED") == "true" else "off"
    if os.environ.get("BILLING_APM_REGISTER_TRANSACTIONS") == "false":
        label += "-unregistered"
    if sampler is not None:
        sampler.__exit__()
        Path(f"{sample_to}.{label}").write_text(
            json.dumps({"samples": sampler.samples, "functions": sampler.functions.most_common(60)})
        )
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(f"{profile_to}.{label}")
    gc.collect()
    memory["after_all"] = {"n": args.invocations, "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb()}
    pg_last = LOOP.run_until_complete(backends())
    doc["heavy_after_aws_bills"] = heavy_loaded()
    by_marketplace: dict[str, list[str]] = {}
    for customer in filter(None, args.marketplace_customers.split(",")):
        response = biller.lambda_handler(event_for(customer), LambdaContext.of())
        failures += len(response.get("batchItemFailures", []))
        by_marketplace[customer] = heavy_loaded()
    doc.update(
        {
            "invocations": args.invocations,
            "failures": failures,
            "durations_s": durations,
            "cpu_s": cpu,
            "connections_opened_per_invocation": connections,
            "connections_opened_total": opened,
            "pg_backends_after_first": pg_first,
            "pg_backends_after_all": pg_last,
            "memory": memory,
            "heavy_after_other_marketplaces": by_marketplace,
        }
    )
    print(json.dumps(doc))


if __name__ == "__main__":
    main()

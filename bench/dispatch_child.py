"""One dispatcher execution environment in a fresh process: dispatch an hour, or a bare send loop.

Run by bench.dispatcher as ``python -m bench.dispatch_child``; moto's server lives in the parent, so
this process's peak RSS is the dispatcher's alone. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any


def _long_before(period_text: str) -> str:
    """An hour a year before ``period_text``: no seeded customer was active then."""
    from datetime import timedelta

    return (datetime.fromisoformat(period_text) - timedelta(days=365)).isoformat()


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec, so a child of
    a large parent would start at the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_handler(period_text: str) -> dict[str, Any]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "functions" / "dispatcher"))
    import dispatcher
    from bench.lambda_events import LambdaContext

    warm_up = {"period": _long_before(period_text)}  # sends nothing
    dispatcher.lambda_handler(warm_up, LambdaContext.of())
    began = time.perf_counter()
    result = dispatcher.lambda_handler({"period": period_text}, LambdaContext.of())
    return {"sent": result["dispatched"], "seconds": time.perf_counter() - began}


async def dispatch(period_text: str) -> dict[str, Any]:
    """The project's dispatch (keyset pages from Postgres → SendMessageBatch through SqsQueue)."""
    from billing.bootstrap import Runtime
    from billing.config import load_settings

    runtime = Runtime(load_settings())
    try:
        # a warm environment: an hour long before any customer was active dispatches nothing, but opens
        # the pool and builds the SQS client, as the first invocation of an execution environment would
        await runtime.dispatch({"period": _long_before(period_text)})
        began = time.perf_counter()
        result = await runtime.dispatch({"period": period_text})
        return {"sent": result.dispatched, "seconds": time.perf_counter() - began}
    finally:
        await runtime.close()


async def bare(count: int, in_flight: int, period_text: str) -> dict[str, Any]:
    """SendMessageBatch of 10 in a loop, ``in_flight`` calls at once, the same bodies, nothing else."""
    from billing.bootstrap import Runtime
    from billing.config import load_settings
    from billing.domain.messages import BillMessageV1

    settings = load_settings()
    runtime = Runtime(settings)
    try:
        sqs = await runtime.aws_client("sqs")
        period = datetime.fromisoformat(period_text)
        run_id = uuid.uuid4()
        body = BillMessageV1(customer_id="cust-000000", period=period, run_id=run_id).to_body()
        todo = iter(range(0, count, 10))

        async def worker() -> int:
            sent = 0
            for start in todo:
                # the same body size as the dispatcher's; only the customer differs
                entries = [
                    {"Id": str(i), "MessageBody": body.replace("cust-000000", f"cust-{start + i:06d}")}
                    for i in range(min(10, count - start))
                ]
                response = await sqs.send_message_batch(QueueUrl=settings.queue_url, Entries=entries)
                sent += len(response.get("Successful", []))
            return sent

        await sqs.get_queue_attributes(QueueUrl=settings.queue_url, AttributeNames=["QueueArn"])
        began = time.perf_counter()
        sent = sum(await asyncio.gather(*(worker() for _ in range(in_flight))))
        return {"sent": sent, "seconds": time.perf_counter() - began}
    finally:
        await runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["dispatch", "handler", "bare"])
    parser.add_argument("--period", required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--in-flight", type=int, default=8)
    args = parser.parse_args()
    if args.mode == "dispatch":
        doc = asyncio.run(dispatch(args.period))
    elif args.mode == "handler":
        doc = run_handler(args.period)
    else:
        doc = asyncio.run(bare(args.count, args.in_flight, args.period))
    doc["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(doc))


if __name__ == "__main__":
    main()

"""6. Where a bill's event-loop CPU goes, against the bare I/O floor measured in the same run.

Two fresh processes (bench.profile_child), each a runner on one event loop, C consumers, against the
bench stack: one with the APM agent as template.yaml configures it (billing_local.runner.APM_SETTINGS:
one transaction per message, a span per SQL statement and marketplace call, no span stack traces),
one without any agent. The first also runs the bare I/O floor (a customer's share of SQS receive and
delete, four asyncpg round trips, one BatchMeterUsage; no agent, no project code) before its runs.
Each process bills N customers twice: once measured (event-loop CPU, the collector's CPU and
collections), once sampled (SIGPROF every millisecond of CPU, each sample counted for the component
whose code ran; see bench.profile_child.Sampler). The ratio of record is from one process's run.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench.common import Section, at_most
from bench.env import PRODUCT, bill_messages, customer_id, last_hour

if TYPE_CHECKING:
    from bench.env import BenchStack

TARGET_RATIO = 1.6
COMPONENTS = (
    "APM agent",
    "GC",
    "botocore",
    "aiohttp",
    "asyncpg",
    "asyncio",
    "project",
    "other libraries",
)


@dataclass
class ProfileParams:
    customers: int
    cap: int


def _send(bench: BenchStack, queue_url: str, bodies: list[str]) -> None:
    import boto3

    sqs = boto3.client("sqs", endpoint_url=bench.local.moto_url)
    for start in range(0, len(bodies), 10):
        sqs.send_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies[start : start + 10])],
        )


def _child(
    bench: BenchStack, template: str, p: ProfileParams, apm: str, floor: bool, log: Any
) -> dict[str, Any]:
    n, cap = p.customers, p.cap
    period = last_hour()
    dsn = asyncio.run(bench.clone(template))
    bench.forget_records()
    bench.marketplace_latency(0.0, 0.0)
    queues = []
    for k in range(2):  # measured, then sampled: customers [0, n) and [n, 2n)
        url = bench.new_queue(f"profile-{apm}-{k}")
        _send(bench, url, [m.to_body() for m in bill_messages(period, k * n, n)])
        queues.append(url)
    args = [
        sys.executable,
        "-m",
        "bench.profile_child",
        "--apm",
        apm,
        "--cap",
        str(cap),
        "--queues",
        ",".join(queues),
        "--sample",
        "--warm-first",
        str(2 * n),
        "--product",
        PRODUCT,
    ]
    floor_queues = []
    if floor:
        # the floor's customers are [2n + cap, 3n + 2cap): records of their own at the emulator
        first = 2 * n + cap
        for count in (cap, n):
            url = bench.new_queue(f"profile-floor-{count}")
            _send(bench, url, [f"aws-{customer_id(first + i)}" for i in range(count)])
            floor_queues.append(url)
            first += count
        args += ["--floor-queues", ",".join(floor_queues), "--floor-counts", str(cap), str(n)]
    env = {**os.environ, "DATABASE_URL": dsn, "BILLING_QUEUE_URL": queues[0]}
    env.pop("BILLING_DB_POOL_MAX", None)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800, check=False)
    for url in queues + floor_queues:
        bench.delete_queue(url)
    asyncio.run(bench.drop(dsn))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"profile_child --apm {apm} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    doc = dict(json.loads(lines[-1]))
    measured = doc["runs"][0]
    log(
        f"  agent {apm}: {measured['cpu_loop_s'] / measured['customers'] * 1000:.2f} ms event-loop CPU per "
        f"customer ({measured['customers']} billed, {measured['failed']} failed), GC "
        f"{measured['gc_cpu_s'] / measured['customers'] * 1000:.2f} ms, generation-2 collections "
        f"{measured['gc_collections']['2']}"
        + (
            f"; floor {doc['floor']['cpu_loop_s'] / doc['floor']['customers'] * 1000:.2f} ms"
            if "floor" in doc
            else ""
        )
    )
    return doc


def _per_customer_ms(run: dict[str, Any], key: str = "cpu_loop_s") -> float:
    return float(run[key]) / max(1, int(run["customers"])) * 1000


def breakdown(run: dict[str, Any], total_ms: float) -> dict[str, dict[str, float]]:
    """Each component's samples of the sampled run, as a share and as ms of ``total_ms`` per customer."""
    samples: dict[str, int] = run.get("samples", {})
    count = sum(samples.values())
    if not count:
        return {}
    return {
        c: {"share": samples.get(c, 0) / count, "ms": samples.get(c, 0) / count * total_ms}
        for c in COMPONENTS
    }


def run(bench: BenchStack, p: ProfileParams, log: Any) -> Section:
    section = Section("profile", "6 profile")
    n, cap = p.customers, p.cap
    log(f"6. profile: N={n} customers, C={cap} consumers, agent as deployed and off, and the I/O floor")
    with bench.linear_moto():
        total = 3 * n + 2 * cap
        template = asyncio.run(bench.seeded_template("bench_profile", total))
        bench.subscribe(total)
        on = _child(bench, template, p, "on", True, log)
        off = _child(bench, template, p, "off", False, log)
    on_run, off_run = on["runs"][0], off["runs"][0]
    floor_ms = _per_customer_ms(on["floor"])
    on_ms, off_ms = _per_customer_ms(on_run), _per_customer_ms(off_run)
    ratio = on_ms / floor_ms if floor_ms else None
    section.add(
        "bare I/O floor: event-loop CPU per customer",
        floor_ms,
        "ms",
        "",
        None,
        "SQS receive/delete share + 4 asyncpg round trips + 1 BatchMeterUsage, C workers, no agent",
    )
    section.add(
        "runner, agent on as deployed: event-loop CPU per customer", on_ms, "ms", "", None, f"N={n}, C={cap}"
    )
    section.add(
        "… ÷ the same run's bare I/O floor",
        ratio,
        "×",
        f"≤ {TARGET_RATIO}",
        at_most(ratio, TARGET_RATIO),
        "" if ratio is None or ratio <= TARGET_RATIO else _reason(on, on_ms, floor_ms),
    )
    section.add(
        "runner, agent off: event-loop CPU per customer",
        off_ms,
        "ms",
        "",
        None,
        f"{off_ms / floor_ms:.2f} × the floor; the agent adds {on_ms - off_ms:.2f} ms "
        f"({(on_ms - off_ms) / on_ms * 100:.0f} %)"
        if floor_ms and on_ms
        else "",
    )
    parts = breakdown(on["runs"][1], on_ms)
    for component, part in parts.items():
        section.add(
            f"agent on: {component}",
            part["ms"],
            "ms",
            "",
            None,
            f"{part['share'] * 100:.0f} % of the samples"
            + (
                f" ({', '.join(on['runs'][1].get('other_modules', {}))})"
                if component == "other libraries"
                else ""
            ),
        )
    for label, doc, ms in (("on", on_run, on_ms), ("off", off_run, off_ms)):
        per_1000 = doc["gc_collections"]["2"] / max(1, doc["customers"]) * 1000
        section.add(
            f"agent {label}: full (generation-2) collections per 1,000 customers",
            per_1000,
            "",
            "",
            None,
            f"collector CPU {_per_customer_ms(doc, 'gc_cpu_s'):.2f} ms per customer "
            f"({_per_customer_ms(doc, 'gc_cpu_s') / ms * 100:.0f} %), measured by gc.callbacks",
        )
    section.note(
        "profile: the per-component figures share the measured run's event-loop CPU out by the samples of "
        "a second, sampled run in the same process (SIGPROF per millisecond of CPU; Cython and C time is "
        "counted for the Python code that called it, asyncpg's protocol for asyncpg). Standard-library "
        "code counts for its caller; 'other libraries' is Powertools, pydantic, stamina and the like."
    )
    section.raw = {
        "params": p.__dict__,
        "on": on,
        "off": off,
        "floor_ms": floor_ms,
        "on_ms": on_ms,
        "off_ms": off_ms,
        "ratio": ratio,
        "breakdown_on": parts,
        "breakdown_off": breakdown(off["runs"][1], off_ms),
    }
    return section


def _reason(on: dict[str, Any], on_ms: float, floor_ms: float) -> str:
    parts = breakdown(on["runs"][1], on_ms)
    top = sorted(parts.items(), key=lambda kv: -kv[1]["ms"])[:3]
    return f"{on_ms - floor_ms:.2f} ms per customer above the floor; the largest parts: " + ", ".join(
        f"{c} {v['ms']:.2f} ms" for c, v in top
    )

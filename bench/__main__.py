"""``make bench`` (``python -m bench``): every benchmark in sequence, a table, JSON, an SVG, Markdown.

``--quick`` is a smoke run at small sizes (a minute or two); the figures of record come from a full
run on a quiet machine. Nothing here asserts a timing: each figure is printed beside its target with
PASS or MISS, and the misses are listed with the reason found.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import RESULTS, Section, machine, markdown, print_table, section_doc, write_json

SECTIONS = (
    "scheduling",
    "cost",
    "dispatcher",
    "coldstart",
    "reports",
    "profile",
    "lambda",
    "quota",
    "lanes",
    "demo_scaling",
)
# the sections that time a bill's own cost bill unpaced (bench/env.py UNPACED_ENV)
UNPACED_SECTIONS = ("scheduling", "cost", "profile", "lambda")


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "scheduling": {
                "customers": 200,
                "cap": 20,
                "latency_s": 0.05,
                "jitter_s": 0.01,
                "reps": 1,
                "sequential_reps": 1,
            },
            "cost": {
                "round_trip_customers": 20,
                "round_trip_cap": 5,
                "throughput_customers": 200,
                "cap": 20,
                "invocations": 100,
                "memory_after": 10,
                "assumed_latency_s": 0.05,
            },
            "dispatcher": {"small": 1_000, "large": 10_000, "rate_customers": 2_000, "reps": 1},
            "coldstart": {"reps": 3},
            "reports": {"customers": 20},
            "profile": {"customers": 300, "cap": 20},
            "lambda": {"invocations": 150, "reps": 1},
            "quota": {"customers": 150, "quota": 10.0, "consumers": 10},
            "lanes": {"customers": 90, "throttle_s": 15.0, "budget_s": 8.0, "aws_quota": 10.0},
            "demo_scaling": {"small": 100, "large": 1_000, "baseline": 10},
        }
    return {
        "scheduling": {
            "customers": 2_000,
            "cap": 50,
            "latency_s": 0.05,
            "jitter_s": 0.01,
            "reps": 3,
            "sequential_reps": 1,
        },
        "cost": {
            "round_trip_customers": 100,
            "round_trip_cap": 10,
            "throughput_customers": 2_000,
            "cap": 50,
            "invocations": 1_000,
            "memory_after": 10,
            "assumed_latency_s": 0.05,
        },
        "dispatcher": {"small": 1_000, "large": 100_000, "rate_customers": 20_000, "reps": 3},
        "coldstart": {"reps": 7},
        "reports": {"customers": 30},
        "profile": {"customers": 2_000, "cap": 50},
        "lambda": {"invocations": 500, "reps": 3},
        # N/Q = 60 s: one run well under two minutes
        "quota": {"customers": 600, "quota": 10.0, "consumers": 10},
        "lanes": {"customers": 300, "throttle_s": 60.0, "budget_s": 10.0, "aws_quota": 10.0},
        "demo_scaling": {"small": 300, "large": 3_000, "baseline": 10},
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run at small sizes")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated, among {', '.join(SECTIONS)}"
    )
    parser.add_argument("--customers", type=int, help="section 1's N (default 2,000; --quick 200)")
    parser.add_argument("--reps", type=int, help="section 1's repetitions (default 3; --quick 1)")
    parser.add_argument(
        "--report", type=Path, help="also write the summary (every figure, target and status) here, as JSON"
    )
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)}")
    sizes = _sizes(args.quick)
    if args.customers:
        sizes["scheduling"]["customers"] = args.customers
    if args.reps:
        sizes["scheduling"]["reps"] = args.reps
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path.cwd() / ".run"))
    # a TERM (a timeout, a CI cancel) unwinds like Ctrl-C: the embedded PostgreSQL and moto are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = machine()
    started = time.perf_counter()
    log(
        f"bench: {'quick' if args.quick else 'full'} run on {info['nproc']} × {info['cpu']}, Python "
        f"{info['python']}, load {info['loadavg_at_start']}"
    )
    config = {
        "quick": args.quick,
        "sizes": _describe(sizes),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": info,
    }

    from bench.env import UNPACED_ENV, bench_stack
    from billing_local.stack import environment

    sections: list[Section] = []
    lambda_doc: dict[str, Any] | None = None
    with bench_stack() as bench:
        apm_client = None
        if {"scheduling", "cost"} & set(chosen):
            from billing_local.local_run import local_apm_client

            apm_client = local_apm_client()
        for key in chosen:
            began = time.perf_counter()
            with environment(UNPACED_ENV) if key in UNPACED_SECTIONS else contextlib.nullcontext():
                section = _run_section(key, bench, sizes, apm_client, lambda_doc)
            if key == "cost":
                lambda_doc = section.raw.get("lambda_environment")
            section.seconds = time.perf_counter() - began
            log(f"  ({key}: {section.seconds:.0f} s)")
            sections.append(section)
            write_json(key, section_doc(section, config | {"section_sizes": sizes.get(key)}))
    config["seconds"] = round(time.perf_counter() - started, 1)
    print_table(sections)
    md = markdown(sections, info, config)
    (RESULTS / "README-table.md").write_text(md)
    summary = {
        **config,
        "figures": [f.__dict__ | {"status": f.status, "section": s.key} for s in sections for f in s.figures],
        "misses": [f"{s.title}: {f.name}" for s in sections for f in s.misses()],
    }
    written = write_json("summary", summary)
    if args.report is not None:
        args.report.write_text(written.read_text())
    sched = next((s for s in sections if s.key == "scheduling"), None)
    if sched is not None:
        from bench.plot import scheduling_svg

        (RESULTS / "scheduling.svg").write_text(scheduling_svg(sched.raw, info))
    print()
    print("Markdown for the README:")
    print()
    print(md)
    print(
        f"results: {RESULTS}/ (*.json, README-table.md{', scheduling.svg' if sched else ''}); took "
        f"{config['seconds']:.0f} s"
    )
    return 0


def _run_section(
    key: str, bench: Any, sizes: dict[str, Any], apm_client: Any, lambda_doc: dict[str, Any] | None
) -> Section:
    from bench import (
        coldstart,
        cost,
        demo_scaling,
        dispatcher,
        lambda_warm,
        lanes,
        profile,
        reports,
        scheduling,
    )

    if key == "scheduling":
        section = scheduling.run(bench, scheduling.Params(**sizes["scheduling"]), apm_client, log)
    elif key == "cost":
        section = cost.run(bench, cost.CostParams(**sizes["cost"]), apm_client, log)
    elif key == "dispatcher":
        section = dispatcher.run(bench, dispatcher.DispatchParams(**sizes["dispatcher"]), log)
    elif key == "coldstart":
        section = coldstart.run(log, sizes["coldstart"]["reps"], lambda_doc)
    elif key == "profile":
        section = profile.run(bench, profile.ProfileParams(**sizes["profile"]), log)
    elif key == "lambda":
        section = lambda_warm.run(bench, lambda_warm.LambdaParams(**sizes["lambda"]), log)
    elif key == "quota":
        section = lanes.run_quota(lanes.QuotaParams(**sizes["quota"]), log)
    elif key == "lanes":
        section = lanes.run_lanes(lanes.LanesParams(**sizes["lanes"]), log)
    elif key == "demo_scaling":
        section = demo_scaling.run(demo_scaling.ScalingParams(**sizes["demo_scaling"]), log)
    else:
        section = reports.run(bench, log, sizes["reports"]["customers"])
    return section


def _describe(sizes: dict[str, Any]) -> str:
    s, c, d = sizes["scheduling"], sizes["cost"], sizes["dispatcher"]
    return (
        f"scheduling N={s['customers']:,} C={s['cap']} L={s['latency_s'] * 1000:.0f} ms, {s['reps']} reps; "
        f"throughput N={c['throughput_customers']:,}; {c['invocations']:,} warm invocations; "
        f"dispatch {d['rate_customers']:,} (rate) and {d['small']:,} vs {d['large']:,} (memory)"
    )


if __name__ == "__main__":
    sys.exit(main())

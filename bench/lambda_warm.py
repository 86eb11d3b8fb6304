"""7. The Lambda shape: a warm invocation's wall time and CPU with the APM agent on, and with it off.

One fresh process per variant is one execution environment (bench.lambda_child): it imports the
biller handler and invokes it warm, one SQS record per invocation, as the Lambda runtime does.

- agent on, as template.yaml configures it with the extension layer: the template's ``ELASTIC_APM_*``,
  ``SKIP_INSTRUMENT_*`` and ``BILLING_APM_*`` values, ``ELASTIC_APM_ENABLED=true``, and the agent's own
  HTTP transport posting to an APM Lambda extension double on 127.0.0.1 (below): the transaction's
  registration at each invocation's start (unless the template's ApmRegisterTransactions is "false")
  and the flush at its end both happen for real; the variant without the registration is printed too;
- agent off: the template's ``ELASTIC_APM_ENABLED=false`` (what it deploys without the extension).

The extension double (billing_local.emulators.apm_extension) serves what the Elastic APM AWS Lambda
extension serves the agent on localhost:8200 (elastic/apm-aws-lambda, apmproxy/receiver.go). Here
it only counts the requests; with the template's ``ELASTIC_APM_SEND_STRATEGY: background`` the real
extension also answers before forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import Section, at_most, median, percentile
from bench.env import APM_ENV, LAMBDA_ENV, last_hour

if TYPE_CHECKING:
    from collections.abc import Iterator

    from bench.env import BenchStack

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.4


@dataclass
class LambdaParams:
    invocations: int
    reps: int


@contextlib.contextmanager
def extension_double() -> Iterator[tuple[str, dict[str, int]]]:
    from billing_local.emulators.apm_extension import apm_extension

    # counts only: decoding what the agent sends would take the CPU being measured
    with apm_extension(keep=False) as (url, extension):
        yield url, extension.counts


def template_agent_env() -> dict[str, str]:
    """The biller's agent settings as template.yaml deploys them (values only a deploy knows left out),
    the project's own (BILLING_APM_REGISTER_TRANSACTIONS) included."""
    from billing_local.template import function_config

    environment = function_config(ROOT / "template.yaml", "Biller").environment
    return {
        k: v
        for k, v in environment.items()
        if v is not None and k.startswith(("ELASTIC_APM_", "SKIP_INSTRUMENT_", "BILLING_APM_"))
    }


def _invoke(bench: BenchStack, template: str, p: LambdaParams, agent_env: dict[str, str]) -> dict[str, Any]:
    dsn = asyncio.run(bench.clone(template))
    bench.forget_records()
    bench.marketplace_latency(0.0, 0.0)
    env = {**os.environ, **LAMBDA_ENV, **agent_env, "DATABASE_URL": dsn}
    env.pop("BILLING_DB_POOL_MAX", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.lambda_child",
            "--period",
            last_hour().start.isoformat(),
            "--invocations",
            str(p.invocations),
            "--memory-after",
            str(min(10, p.invocations)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    asyncio.run(bench.drop(dsn))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{") and '"durations_s"' in line]
    if proc.returncode or not lines:
        raise RuntimeError(f"bench.lambda_child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    doc = json.loads(lines[-1])
    warm_wall, warm_cpu = doc["durations_s"][1:], doc["cpu_s"][1:]
    return {
        "wall_p50_ms": (percentile(warm_wall, 50) or 0) * 1000,
        "wall_p99_ms": (percentile(warm_wall, 99) or 0) * 1000,
        "cpu_p50_ms": (percentile(warm_cpu, 50) or 0) * 1000,
        "failures": doc["failures"],
        "invocations": doc["invocations"],
    }


def run(bench: BenchStack, p: LambdaParams, log: Any) -> Section:
    section = Section("lambda", "7 Lambda shape")
    log(f"7. Lambda shape: {p.invocations} warm invocations per environment, agent on and off, ×{p.reps}")
    template = asyncio.run(bench.seeded_template("bench_lambda_warm", p.invocations))
    bench.subscribe(p.invocations)
    deployed = template_agent_env()
    quiet = {k: v for k, v in APM_ENV.items() if k in ("ELASTIC_APM_SERVICE_NAME", "ELASTIC_APM_ENVIRONMENT")}
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": [], "unregistered": []}
    with extension_double() as (url, counts):
        on_env = {
            **deployed,
            **quiet,
            "ELASTIC_APM_ENABLED": "true",  # as with the extension layer
            "ELASTIC_APM_SERVER_URL": url,  # the extension's localhost:8200
            "ELASTIC_APM_LAMBDA_APM_SERVER": "https://apm.invalid",  # where the extension would forward
        }
        off_env = {**deployed, **quiet, "ELASTIC_APM_ENABLED": "false"}
        # information: the agent on with the template's ApmRegisterTransactions turned off
        unregistered_env = {**on_env, "BILLING_APM_REGISTER_TRANSACTIONS": "false"}
        variants = (("on", on_env), ("off", off_env), ("unregistered", unregistered_env))
        for rep in range(p.reps):  # interleaved: a noisy moment hits every variant alike
            for label, env in variants:
                result = _invoke(bench, template, p, env)
                runs[label].append(result)
                log(
                    f"  agent {label} rep {rep + 1}: warm wall p50 {result['wall_p50_ms']:.2f} ms, CPU p50 "
                    f"{result['cpu_p50_ms']:.2f} ms, failures {result['failures']}"
                )
        extension_calls = dict(counts)
    wall_on = median([r["wall_p50_ms"] for r in runs["on"]]) or 0.0
    wall_off = median([r["wall_p50_ms"] for r in runs["off"]]) or 0.0
    cpu_on = median([r["cpu_p50_ms"] for r in runs["on"]]) or 0.0
    cpu_off = median([r["cpu_p50_ms"] for r in runs["off"]]) or 0.0
    wall_unregistered = median([r["wall_p50_ms"] for r in runs["unregistered"]]) or 0.0
    ratio = wall_on / wall_off if wall_off else None
    section.add("warm invocation wall p50, agent on as deployed", wall_on, "ms", note=f"CPU {cpu_on:.2f} ms")
    section.add("warm invocation wall p50, agent off", wall_off, "ms", "", None, f"CPU {cpu_off:.2f} ms")
    section.add(
        "wall p50, agent on ÷ agent off",
        ratio,
        "×",
        f"≤ {TARGET_RATIO}",
        at_most(ratio, TARGET_RATIO),
        f"CPU p50 on ÷ off {cpu_on / cpu_off:.2f} ×; the extension double saw "
        f"{extension_calls['register']} registrations and {extension_calls['intake']} intake requests "
        f"({extension_calls['flushed']} with flushed=true)"
        if cpu_off
        else "",
    )
    section.add(
        "… with ApmRegisterTransactions=false (no registration per invocation): wall p50",
        wall_unregistered,
        "ms",
        "",
        None,
        f"{wall_unregistered / wall_off:.2f} × agent off" if wall_off else "",
    )
    section.add(
        "failed invocations",
        sum(r["failures"] for rs in runs.values() for r in rs),
        "",
        "0",
        all(r["failures"] == 0 for rs in runs.values() for r in rs),
    )
    section.note(
        "Lambda shape: warm = every invocation after the first; wall and CPU (the process's, the agent's "
        "sender thread included) per invocation, medians over the repetitions of each process's p50. "
        "Logs at WARNING and metrics off in both variants (bench/env.py QUIET_ENV)."
    )
    section.raw = {
        "params": p.__dict__,
        "runs": runs,
        "agent_env_on": {k: v for k, v in on_env.items() if "SECRET" not in k and "API_KEY" not in k},
        "extension_calls": extension_calls,
        "wall_ratio": ratio,
    }
    return section

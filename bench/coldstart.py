"""4. Cold start: import time of each handler module beside the third-party libraries it needs.

Each figure is the median over fresh processes of ``python -S -X importtime`` with Lambda's search
path: the function's code directory, the layer (``shared/``) and the layer's third-party packages,
installed once from ``shared/requirements.txt`` for this machine into ``.venv/lambda-site`` (the dev
venv also holds moto, Flask, Jinja2 and GraphQL, which the agent's ``instrument()`` would import too).

- handler: ``import biller`` (or ``dispatcher``), the APM agent enabled as with the extension layer;
- libraries alone: a fresh process importing exactly the third-party modules that the handler's own
  modules import (recorded with an import hook), and nothing of the project;
- the project's own code adds (handler - libraries) / libraries; where that goes is read from
  ``-X importtime`` (the project's modules' self time) and from the same import with the agent off.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import Section, at_most, median

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "shared" / "requirements.txt"
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
    "aiohttp",
    "botocore",
    "aiobotocore",
    "aioboto3",
    "boto3",
    "asyncpg",
    "elasticapm",
    "aws_lambda_powertools",
    "pydantic",
    "cryptography",
    "jinja2",
    "graphql",
)
PROJECT_PREFIXES = ("billing", "biller", "dispatcher")

_PROBE = r"""
import sys, time, json, builtins
sys.path[:0] = {paths!r}
direct = []
real_import = builtins.__import__
def hook(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {{}}).get("__name__", "")
    if level == 0 and importer.split(".")[0] in {project!r} and name.split(".")[0] not in {project!r} \
            and name.split(".")[0] not in sys.stdlib_module_names and name not in direct:
        direct.append(name)
    return real_import(name, globals, locals, fromlist, level)
if {record!r}:
    builtins.__import__ = hook
began = time.perf_counter()
import {module}
wall = time.perf_counter() - began
builtins.__import__ = real_import
heavy = [m for m in {heavy!r} if m in sys.modules]
print("BENCH" + json.dumps({{"wall": wall, "direct": direct, "heavy": heavy, "modules": len(sys.modules)}}))
"""

_LIBS = r"""
import sys, time, json, importlib
sys.path[:0] = {paths!r}
began = time.perf_counter()
for name in {names!r}:
    importlib.import_module(name)
wall = time.perf_counter() - began
print("BENCH" + json.dumps({{"wall": wall, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def lambda_site(log: Any) -> tuple[Path | None, str]:
    """The layer's third-party packages for this machine, installed once; (path, how)."""
    venv = Path(sys.prefix)
    target = venv / "lambda-site"
    stamp = target / ".requirements.sha256"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return target, f"{target} (shared/requirements.txt, installed earlier)"
    log(f"  installing shared/requirements.txt into {target} (once)")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--upgrade",
            "--target",
            str(target),
            "-r",
            str(REQUIREMENTS),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        log(f"  pip failed; measuring with the dev venv instead:\n{proc.stderr[-1500:]}")
        return None, "the dev venv (pip could not install shared/requirements.txt)"
    stamp.write_text(digest)
    return target, f"{target} (shared/requirements.txt)"


# What template.yaml's Globals set so that elasticapm.instrument() leaves alone the libraries the functions
# never call; the Elasticsearch one only with the postgres usage source.
SKIP_UNUSED = {
    "SKIP_INSTRUMENT_ELASTICSEARCH_CONNECTION": "true",
    "SKIP_INSTRUMENT_AZURE": "true",
    "SKIP_INSTRUMENT_REQUESTS": "true",
    "SKIP_INSTRUMENT_URLLIB3": "true",
}
# imported by the functions' code on its first use (the first bill, the first dispatch), not at import
LAZY = ("aioboto3", "asyncpg")


def _env(function: str, apm: bool, skip: bool = False) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EXECUTION_ENV": "AWS_Lambda_python3.13",
        "AWS_LAMBDA_FUNCTION_NAME": f"billing-{function}",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "512",
        "DATABASE_URL": "postgresql://billing@db.invalid/billing",
        "BILLING_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/billing-queue",
        "BILLING_USAGE_SOURCE": "postgres",
        "POWERTOOLS_SERVICE_NAME": f"billing-{function}",
        # as template.yaml sets them
        "ELASTIC_APM_ENABLED": "true" if apm else "false",
        "ELASTIC_APM_SEND_STRATEGY": "background",
        "ELASTIC_APM_COLLECT_LOCAL_VARIABLES": "off",
    }
    return env | (SKIP_UNUSED if skip else {})


def _run(code: str, env: dict[str, str], importtime: bool = False) -> tuple[dict[str, Any], str]:
    args = [sys.executable, "-S"] + (["-X", "importtime"] if importtime else []) + ["-c", code]
    proc = subprocess.run(
        args,
        env={k: v for k, v in env.items() if v},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH"):
            return dict(json.loads(line[5:])), proc.stderr
    raise RuntimeError(f"import probe failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def _parse_importtime(stderr: str) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        fields = line[len("import time:") :].split("|")
        self_us, cumulative_us, name = float(fields[0]), float(fields[1]), fields[2].strip()
        out[name] = (self_us, cumulative_us)
    return out


def measure(function: str, paths: list[str], reps: int, log: Any) -> dict[str, Any]:
    probe = _PROBE.format(paths=paths, project=PROJECT_PREFIXES, record=True, module=function, heavy=HEAVY)
    first, _ = _run(probe, _env(function, apm=True))
    direct = first["direct"]
    timing = _PROBE.format(paths=paths, project=PROJECT_PREFIXES, record=False, module=function, heavy=HEAVY)
    scripts = {
        "libraries": (_LIBS.format(paths=paths, names=direct, heavy=HEAVY), _env(function, apm=True)),
        "libraries_needed": (
            _LIBS.format(paths=paths, names=[*direct, *LAZY], heavy=HEAVY),
            _env(function, apm=True),
        ),
        "handler": (timing, _env(function, apm=True)),
        "handler_no_apm": (timing, _env(function, apm=False)),
        "handler_skip_unused": (timing, _env(function, apm=True, skip=True)),
    }
    walls: dict[str, list[float]] = {k: [] for k in scripts}
    heavy: dict[str, list[str]] = {}
    project_self: list[float] = []
    for _ in range(reps):
        for key, (code, env) in scripts.items():  # interleaved: a noisy moment hits every figure alike
            doc, stderr = _run(code, env, importtime=key == "handler")
            walls[key].append(doc["wall"])
            heavy[key] = doc["heavy"]
            if key == "handler":
                times = _parse_importtime(stderr)
                project_self.append(
                    sum(s for name, (s, _c) in times.items() if name.split(".")[0] in PROJECT_PREFIXES) / 1e6
                )
    result = {k: median(v) for k, v in walls.items()} | {
        "project_modules_self_s": median(project_self),
        "direct_imports": direct,
        "lazy_imports": list(LAZY),
        "heavy": heavy,
        "samples": walls,
    }
    log(
        f"  {function}: import {result['handler'] * 1000:.0f} ms with the agent, "
        f"{result['handler_skip_unused'] * 1000:.0f} ms with SKIP_INSTRUMENT_* for unused libraries, "
        f"{result['handler_no_apm'] * 1000:.0f} ms without; libraries it imports "
        f"{result['libraries'] * 1000:.0f} ms, with {', '.join(LAZY)} "
        f"{result['libraries_needed'] * 1000:.0f} ms"
    )
    return result


def over(handler: float, libraries: float) -> float | None:
    return (handler - libraries) / libraries if libraries else None


def run(log: Any, reps: int, lambda_doc: dict[str, Any] | None) -> Section:
    section = Section("coldstart", "4 cold start")
    log(f"4. cold start: median of {reps} fresh processes per figure")
    site, how = lambda_site(log)
    raw: dict[str, Any] = {"site": how, "reps": reps}
    for function in ("biller", "dispatcher"):
        paths = [str(ROOT / "functions" / function), str(ROOT / "shared")]
        if site is not None:
            paths.append(str(site))
        else:
            paths += [p for p in sys.path if p.endswith("site-packages")]
        m = measure(function, paths, reps, log)
        raw[function] = m
        off = over(m["handler_no_apm"], m["libraries"])
        on = over(m["handler"], m["libraries_needed"])
        skip = over(m["handler_skip_unused"], m["libraries_needed"])
        section.add(
            f"import {function}, APM agent on", m["handler"] * 1000, "ms", "", None, f"median of {reps}"
        )
        section.add(f"import {function}, APM agent off", m["handler_no_apm"] * 1000, "ms", "", None)
        section.add(
            f"{function}: the libraries it imports, alone",
            m["libraries"] * 1000,
            "ms",
            "",
            None,
            ", ".join(m["direct_imports"]),
        )
        section.add(
            f"{function}: … and {' and '.join(LAZY)} (imported on first use; the agent imports them at init)",
            m["libraries_needed"] * 1000,
            "ms",
            "",
            None,
        )
        section.add(
            f"{function}: the project's code adds, agent off",
            None if off is None else off * 100,
            "%",
            "≤ 10 %",
            at_most(off, 0.10),
            f"its own modules: {m['project_modules_self_s'] * 1000:.0f} ms of self time (-X importtime)"
            if off is not None and off > 0.10
            else "",
        )
        # the target applies to the configuration template.yaml deploys (its Globals set SKIP_UNUSED);
        # the agent's defaults are shown beside it, with what they cost
        section.add(
            f"{function}: the project's code adds, agent on as template.yaml configures it",
            None if skip is None else skip * 100,
            "%",
            "≤ 10 %",
            at_most(skip, 0.10),
            ", ".join(SKIP_UNUSED),
        )
        section.add(
            f"{function}: … agent on with its defaults (no SKIP_INSTRUMENT_*)",
            None if on is None else on * 100,
            "%",
        )
        if on is not None and on > 0.10:
            section.note(f"{function}, agent with its defaults: {_why(m)}")
        loaded = m["heavy"]["handler"]
        section.note(f"{function}: heavy modules after import, agent on: {', '.join(loaded)}")
        for name, bad in (
            ("elasticsearch", "Elasticsearch client"),
            ("google.auth", "google-auth"),
            ("azure.identity", "azure-identity"),
        ):
            section.add(
                f"{function}: {bad} not imported at cold start (usage source postgres)",
                "not imported" if name not in loaded else "IMPORTED",
                "",
                "not imported",
                name not in loaded,
            )
        eager = [x for x in loaded if x not in m["heavy"]["handler_skip_unused"]]
        if eager:
            section.note(
                f"{function}: imported at cold start although the function never calls it: "
                f"{', '.join(eager)}, by "
                "elasticapm.instrument() (capture_serverless runs it at import; it imports every library it "
                "knows "
                f"how to instrument). With {', '.join(SKIP_UNUSED)} set they are not."
            )
    if lambda_doc:
        seen = {
            "after import": lambda_doc.get("heavy_after_import", []),
            "after the first AWS bill": lambda_doc.get("heavy_after_first_bill", []),
        }
        for customer, loaded in lambda_doc.get("heavy_after_other_marketplaces", {}).items():
            seen[f"after billing {customer}"] = loaded
        raw["lazy_sdks"] = seen
        before = seen["after the first AWS bill"]
        for name, label in (("google.auth", "google-auth"), ("azure.identity", "azure-identity")):
            section.add(
                f"biller: {label} not imported by AWS bills",
                "not imported" if name not in before else "IMPORTED",
                "",
                "not imported until a customer of that marketplace",
                name not in before,
            )
        for stage, loaded in seen.items():
            section.note(
                f"biller (dev venv, warm-invocation process): heavy modules {stage}: {', '.join(loaded)}"
            )
    section.raw = raw
    return section


def _why(m: dict[str, Any]) -> str:
    eager = [x for x in m["heavy"]["handler"] if x not in m["heavy"]["handler_skip_unused"]]
    return (
        "capture_serverless builds the agent and runs elasticapm.instrument() at import, which imports every "
        f"library it can instrument: {', '.join(eager) or 'none'} although the function never calls them "
        f"({(m['handler'] - m['handler_skip_unused']) * 1000:.0f} ms)"
    )

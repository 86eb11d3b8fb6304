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

Bytecode (``python -m bench.coldstart`` runs this part alone): the layer exactly as shared/Makefile builds
it, for this machine's architecture, imported by Python 3.13 (Lambda's) from a read-only copy with
PYTHONDONTWRITEBYTECODE=1, as from Lambda's /opt: without bytecode (every module compiled at every cold
start), with the checked-hash .pyc files the Makefile ships, and with unchecked-hash ones (what checking
the sources' hashes costs).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
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


def _run(
    code: str, env: dict[str, str], importtime: bool = False, python: str = sys.executable
) -> tuple[dict[str, Any], str]:
    args = [python, "-S"] + (["-X", "importtime"] if importtime else []) + ["-c", code]
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
    add_bytecode(section, bytecode(log, reps))
    return section


def _why(m: dict[str, Any]) -> str:
    eager = [x for x in m["heavy"]["handler"] if x not in m["heavy"]["handler_skip_unused"]]
    return (
        "capture_serverless builds the agent and runs elasticapm.instrument() at import, which imports every "
        f"library it can instrument: {', '.join(eager) or 'none'} although the function never calls them "
        f"({(m['handler'] - m['handler_skip_unused']) * 1000:.0f} ms)"
    )


# --- bytecode: the layer as shipped, against the layer without .pyc ------------------------------------

SHARED = ROOT / "shared"


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "-C", str(SHARED), *args],
        env={**os.environ, "LAYER_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def _read_only(tree: Path, writable: bool = False) -> None:
    for path in [tree, *tree.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if writable else mode & ~0o222)


def bytecode(log: Any, reps: int) -> dict[str, Any] | None:
    """Median import time of each handler from the layer with no .pyc, checked-hash and unchecked-hash."""
    found = _make("print-layer-target-python")
    if found.returncode != 0:
        log(f"  bytecode: skipped, {found.stderr.strip()}")
        return None
    py313 = found.stdout.strip()
    arch = platform.machine()
    work = Path(tempfile.mkdtemp(prefix="bench-layer-"))
    trees = {"none": work / "none", "checked": work / "checked" / "python", "unchecked": work / "unchecked"}
    try:
        log(f"  bytecode: building the layer for manylinux2014_{arch} with {py313} (shared/Makefile)")
        built = _make(
            "build-SharedLayer", f"ARTIFACTS_DIR={work / 'checked'}", f"LAYER_PLATFORM=manylinux2014_{arch}"
        )
        if built.returncode != 0:
            log(f"  bytecode: skipped, the layer build failed:\n{built.stderr[-1500:]}")
            return None
        shutil.copytree(trees["checked"], trees["none"], ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(trees["none"], trees["unchecked"])
        subprocess.run(
            [
                py313,
                "-m",
                "compileall",
                "-q",
                "-j0",
                "--invalidation-mode",
                "unchecked-hash",
                trees["unchecked"],
            ],
            check=True,
        )
        for tree in trees.values():
            _read_only(tree)
        result: dict[str, Any] = {"python": py313, "platform": f"manylinux2014_{arch}", "reps": reps}
        for function in ("biller", "dispatcher"):
            walls: dict[str, list[float]] = {k: [] for k in trees}
            for _ in range(reps):
                for key, tree in trees.items():  # interleaved: a noisy moment hits every tree alike
                    paths = [str(ROOT / "functions" / function), str(tree)]
                    probe = _PROBE.format(
                        paths=paths, project=PROJECT_PREFIXES, record=False, module=function, heavy=HEAVY
                    )
                    env = _env(function, apm=True, skip=True) | {"PYTHONDONTWRITEBYTECODE": "1"}
                    doc, _ = _run(probe, env, python=py313)
                    walls[key].append(doc["wall"])
            medians = {k: median(v) for k, v in walls.items()}
            result[function] = {"median_s": medians, "samples": walls}
            log(
                f"  {function} on Python 3.13, read-only layer: {medians['none'] * 1000:.0f} ms without "
                f"bytecode, {medians['checked'] * 1000:.0f} ms with checked-hash .pyc (shipped), "
                f"{medians['unchecked'] * 1000:.0f} ms with unchecked-hash; "
                f"{medians['none'] / medians['checked']:.2f}x"
            )
        return result
    finally:
        for tree in trees.values():
            if tree.exists():
                _read_only(tree, writable=True)
        shutil.rmtree(work, ignore_errors=True)


def add_bytecode(section: Section, doc: dict[str, Any] | None) -> None:
    if doc is None:
        section.note("bytecode: not measured (no Python 3.13, or the layer build failed)")
        return
    for function in ("biller", "dispatcher"):
        m = doc[function]["median_s"]
        section.add(
            f"{function}: import from the read-only layer on Python 3.13, no bytecode (before)",
            m["none"] * 1000,
            "ms",
            "",
            None,
            f"median of {doc['reps']}, {doc['platform']}",
        )
        section.add(
            f"{function}: … with the checked-hash .pyc shared/Makefile ships (after)",
            m["checked"] * 1000,
            "ms",
        )
        section.add(f"{function}: … with unchecked-hash .pyc", m["unchecked"] * 1000, "ms")
        section.add(
            f"{function}: import time without bytecode ÷ with it",
            m["none"] / m["checked"],
            "×",
            "> 1",
            m["none"] > m["checked"],
        )
    section.raw["bytecode"] = doc


if __name__ == "__main__":
    figures = bytecode(print, int(sys.argv[1]) if len(sys.argv) > 1 else 7)
    sys.exit(0 if figures else 1)

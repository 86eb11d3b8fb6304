"""The layer as `sam build` makes it (shared/Makefile): the lock, and bytecode compiled by Python 3.13.

Builds the whole layer for real (pip fetches the cp313 manylinux2014_aarch64 wheels the lock names,
about 15 s) into a temporary ARTIFACTS_DIR, then asks a Python 3.13, Lambda's version, about it.
Skipped only when this machine has no Python 3.13 at all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT / "shared"


def python313() -> str | None:
    """The Python 3.13 shared/Makefile would compile with (it looks on PATH, then in pyenv's versions)."""
    found = subprocess.run(
        ["make", "-s", "-C", str(SHARED), "print-layer-target-python"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.strip() or None if found.returncode == 0 else None


PY313 = python313()
needs_313 = pytest.mark.skipif(
    PY313 is None, reason="no Python 3.13 on PATH or in pyenv: cannot build the layer"
)


def make(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "-C", str(SHARED), *args],
        env={**os.environ, "LAYER_PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    artifacts = tmp_path_factory.mktemp("layer")
    # as `make sam-build` runs it: under the top-level Makefile, which exports a PYTHONPYCACHEPREFIX
    prefix = str(tmp_path_factory.mktemp("pycache-prefix"))
    built = make("build-SharedLayer", f"ARTIFACTS_DIR={artifacts}", PYTHONPYCACHEPREFIX=prefix)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    yield artifacts / "python"


# Run by the 3.13 interpreter: every .py must have its 3.13 .pyc, hash-checked, for exactly this source.
_AUDIT = textwrap.dedent(
    """
    import importlib.util, json, pathlib, sys
    root = pathlib.Path(sys.argv[1])
    report = {"sources": 0, "missing": [], "stale": [], "not_checked_hash": [], "foreign": []}
    for source in root.rglob("*.py"):
        report["sources"] += 1
        cached = pathlib.Path(importlib.util.cache_from_source(str(source)))
        if not cached.exists():
            report["missing"].append(str(source.relative_to(root)))
            continue
        head = cached.read_bytes()[:16]
        flags = int.from_bytes(head[4:8], "little")
        if head[:4] != importlib.util.MAGIC_NUMBER:
            report["foreign"].append(str(cached.relative_to(root)))
        elif flags != 0b11:  # hash-based (bit 0) and checked against the source (bit 1)
            report["not_checked_hash"].append(str(cached.relative_to(root)))
        elif head[8:16] != importlib.util.source_hash(source.read_bytes()):
            report["stale"].append(str(source.relative_to(root)))
    report["other_versions"] = [
        str(p.relative_to(root)) for p in root.rglob("*.pyc") if ".cpython-313." not in p.name
    ]
    print(json.dumps(report))
    """
)


@needs_313
def test_every_module_of_the_layer_has_checked_bytecode_of_python_313(layer: Path) -> None:
    assert PY313 is not None
    # -I: where Python looks for bytecode must not depend on this process's PYTHON* variables
    audit = subprocess.run(
        [PY313, "-I", "-c", _AUDIT, str(layer)], capture_output=True, text=True, check=True
    )
    report = json.loads(audit.stdout)
    assert report["sources"] > 1000  # the billing package and every third-party package
    assert (layer / "billing" / "__pycache__").is_dir()
    problems = {k: v[:5] for k, v in report.items() if k != "sources" and v}
    assert problems == {}


# Imports pure-Python modules of a read-only copy of the layer, as Lambda's /opt: counts compilations.
_IMPORTS = textwrap.dedent(
    """
    import importlib, importlib.machinery as m, json, sys
    compiled = []
    real = m.SourceFileLoader.source_to_code
    def counting(self, data, path, *args, **kwargs):
        compiled.append(path)
        return real(self, data, path, *args, **kwargs)
    m.SourceFileLoader.source_to_code = counting
    sys.path.insert(0, sys.argv[1])
    # pure Python only: the layer's compiled extensions are for aarch64
    for name in ("billing.domain.model", "billing.domain.errors", "dateutil.parser", "jmespath", "idna",
                 "urllib3", "six", "aiofiles", "tenacity"):
        importlib.import_module(name)
    files = [getattr(mod, "__file__", None) or "" for mod in list(sys.modules.values())]
    loaded = [f for f in files if f.startswith(sys.argv[1])]
    print(json.dumps({"compiled": compiled, "loaded": len(loaded)}))
    """
)


@needs_313
def test_imports_from_the_read_only_layer_compile_nothing(layer: Path, tmp_path: Path) -> None:
    assert PY313 is not None
    opt = tmp_path / "opt-python"
    shutil.copytree(layer, opt)
    for path in [opt, *opt.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)  # read-only, as /opt is in Lambda
    try:
        env = {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1"}
        run = subprocess.run(
            [PY313, "-I", "-B", "-c", _IMPORTS, str(opt)], capture_output=True, text=True, env=env
        )
        assert run.returncode == 0, run.stderr[-2000:]
        report = json.loads(run.stdout)
        assert report["loaded"] > 50
        assert report["compiled"] == []
    finally:
        for path in [opt, *opt.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


@needs_313
def test_the_layer_ships_the_migrations_beside_the_postgres_adapter(layer: Path) -> None:
    # Given the SQL migrations in the source tree, When the layer is built, Then it holds each of them
    # unchanged, where `python -m billing.migrate` looks for them
    source = SHARED / "billing" / "adapters" / "migrations"
    shipped = layer / "billing" / "adapters" / "migrations"
    expected = {p.name: p.read_bytes() for p in source.glob("*.sql")}
    assert len(expected) >= 4
    assert {p.name: p.read_bytes() for p in shipped.glob("*.sql")} == expected


def test_the_layer_ships_the_ca_bundles_the_database_tls_verifies_against(layer: Path) -> None:
    # Given the CA bundles billing.adapters.postgres_tls reads (billing/certs, beside the package),
    # When the layer is built, Then it holds each of them unchanged: without them every TLS connection
    # to RDS fails its verification in the deployed functions
    source = SHARED / "billing" / "certs"
    shipped = layer / "billing" / "certs"
    expected = {p.name: p.read_bytes() for p in source.glob("*.pem")}
    assert {"rds-global-bundle.pem", "amazon-root-cas.pem"} <= set(expected)
    assert {p.name: p.read_bytes() for p in shipped.glob("*.pem")} == expected


def test_a_build_without_python_313_fails_and_says_why() -> None:
    missing = make("layer-target-python", "LAYER_TARGET_PYTHON=")
    assert missing.returncode != 0
    assert "no Python 3.13 found" in missing.stderr
    wrong = make("layer-target-python", f"LAYER_TARGET_PYTHON={sys.executable}")
    assert wrong.returncode != 0
    assert "not 3.13" in wrong.stderr

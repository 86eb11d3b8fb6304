"""Fixtures for the template tests: template.yaml and samconfig.toml as parsed data, and SAM's transform."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAM_TRANSFORM = Path(__file__).resolve().parent / "sam_transform.py"
# `make check-template` names the SAM venv's interpreter here: then a missing SAM is an error, not a skip.
SAM_PYTHON_VARIABLE = "BILLING_SAM_PYTHON"

# billing_local is normally installed into .venv; a fresh checkout can still run these tests.
if importlib.util.find_spec("billing_local") is None:
    sys.path.insert(0, str(ROOT / "local"))

from billing_local.template import Template, load_template  # noqa: E402

Transform = Callable[[Template | Path], dict[str, Any]]


@pytest.fixture(scope="session")
def template() -> Template:
    """template.yaml, parsed once. Tests that mutate it work on a deep copy."""
    return load_template(ROOT / "template.yaml")


@pytest.fixture(scope="session")
def samconfig() -> dict[str, Any]:
    with (ROOT / "samconfig.toml").open("rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="session")
def sam_python() -> Path:
    """The SAM CLI venv's interpreter (the project venv cannot hold aws-sam-cli, see mk/sam.mk)."""
    configured = os.environ.get(SAM_PYTHON_VARIABLE)
    if configured:
        path = Path(configured)
        if not path.is_file():
            pytest.fail(f"{SAM_PYTHON_VARIABLE}={configured} does not exist")
        return path
    path = ROOT / ".venv-sam" / "bin" / "python"
    if not path.is_file():
        pytest.skip("no .venv-sam: `make check-template` creates it and runs these tests with SAM")
    return path


@pytest.fixture(scope="session")
def transform(sam_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Transform:
    """A function: a template file, or a parsed (mutated) copy -> the CloudFormation SAM makes of it."""

    def run(template: Template | Path) -> dict[str, Any]:
        if isinstance(template, Path):
            path = template
        else:
            # JSON is YAML: the long-form intrinsics of the parsed copy read back unchanged
            path = tmp_path_factory.mktemp("sam") / "template.yaml"
            path.write_text(json.dumps(template), encoding="utf-8")
        result = subprocess.run(
            [str(sam_python), str(SAM_TRANSFORM), str(path)],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "SAM_CLI_TELEMETRY": "0"},
        )
        if result.returncode != 0:
            raise AssertionError(f"SAM could not transform the template:\n{result.stderr}")
        transformed: dict[str, Any] = json.loads(result.stdout)
        return transformed

    return run


@pytest.fixture(scope="session")
def transformed(transform: Transform) -> dict[str, Any]:
    """template.yaml as SAM deploys it."""
    return transform(ROOT / "template.yaml")

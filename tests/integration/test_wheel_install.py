"""template.yaml is found from a wheel install too, where the package lives in site-packages.

The project is built into a wheel and unpacked into a fresh virtual environment (a wheel's pure-Python
install is its unpacked archive); the dependencies come from this environment's site-packages through a
.pth line, whose own .pth files (the editable install's) Python does not process, so billing_local is
imported from the wheel. It used to find the template at ``Path(__file__).parents[2]``: in site-packages
that is ``lib/python3.X``, and ``QueueSettings.from_template()`` raised FileNotFoundError.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from billing_local.template import stack_defaults

ROOT = Path(__file__).resolve().parents[2]

_PROBE = textwrap.dedent(
    """
    import billing_local
    from billing_local.stack import QueueSettings
    from billing_local.template import find_template

    print(billing_local.__file__)
    print(find_template())
    print(QueueSettings.from_template().max_concurrency)
    """
)


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment's interpreter with the project installed from its wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "shared" / "billing", source / "shared" / "billing", ignore=ignore)
    shutil.copytree(ROOT / "local" / "billing_local", source / "local" / "billing_local", ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
         "--wheel-dir", str(tmp / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp / "dist").glob("marketplace_billing-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout.strip()
    )  # fmt: skip
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(purelib)
    (purelib / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def _probe(python: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-c", _PROBE],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_wheel_install_run_from_the_project_root_finds_its_template(wheel_python: Path) -> None:
    proc = _probe(wheel_python, ROOT)
    assert proc.returncode == 0, proc.stderr
    module, template, concurrency = proc.stdout.split()
    assert Path(module).is_relative_to(wheel_python.parents[1])  # imported from the wheel, not the checkout
    assert Path(template) == ROOT / "template.yaml"
    assert int(concurrency) == stack_defaults(ROOT / "template.yaml").biller_max_concurrency


def test_a_wheel_install_elsewhere_takes_the_variable_or_says_what_to_set(
    wheel_python: Path, tmp_path: Path
) -> None:
    named = _probe(wheel_python, tmp_path, {"BILLING_TEMPLATE": str(ROOT / "template.yaml")})
    assert named.returncode == 0, named.stderr
    assert Path(named.stdout.split()[1]) == ROOT / "template.yaml"
    # a wheel records no source directory: nothing to fall back on but a clear error
    lost = _probe(wheel_python, tmp_path)
    assert lost.returncode != 0
    assert "TemplateNotFoundError" in lost.stderr and "BILLING_TEMPLATE" in lost.stderr

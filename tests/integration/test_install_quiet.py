"""`make`'s editable install prints no warning a newcomer cannot act on.

The install line of the Makefile (the one every `make` target bootstraps through) is run as it is
written, with its environment, on a copy of the project (``--no-deps``, into a prefix of its own; pip
builds the editable wheel with the real setuptools from PyPI in an isolated build environment). Before,
every install printed setuptools' license-table deprecation warnings, then its "!!"-framed notice about
folders named like the package.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _makefile_install_environment() -> dict[str, str]:
    """The variables the Makefile's ``pip install -e`` line sets (its ``$(QUIET_BUILD)``)."""
    makefile = (ROOT / "Makefile").read_text()
    (line,) = [x for x in makefile.splitlines() if "pip install" in x and " -e " in x]
    quiet = re.search(r"^QUIET_BUILD\s*=\s*(.*)$", makefile, re.M)
    words = shlex.split(line.replace("$(QUIET_BUILD)", quiet.group(1) if quiet else ""))
    return dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))


def test_the_editable_install_prints_no_warning(tmp_path: Path) -> None:
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "shared" / "billing", source / "shared" / "billing", ignore=ignore)
    shutil.copytree(ROOT / "local" / "billing_local", source / "local" / "billing_local", ignore=ignore)
    # this machine's environment (its pip configuration), with the Makefile's variables for the install
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | _makefile_install_environment()
    # a fresh environment of its own, installed into by this pip (--python): the test's own environment,
    # which holds the project's editable install, is left alone
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
         "--disable-pip-version-check", "--no-deps", "-e", str(source)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    # pip's own note about this machine's index configuration is not the project's
    lines = [x for x in output.splitlines() if x.strip() and "is ignored: it is neither a file" not in x]
    assert not [x for x in lines if re.search(r"warning|deprecat|!!", x, re.I)], "\n".join(lines)

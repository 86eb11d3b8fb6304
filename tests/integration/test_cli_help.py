"""`billing <command> --help` fits 80 columns and names the environment variables the command reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from billing_local.help_env import ENVIRONMENT

BILLING = str(Path(sys.executable).parent / "billing")


@pytest.mark.parametrize("command", sorted(ENVIRONMENT))
def test_help_names_the_environment_at_80_columns(command: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "LINES"}} | {"COLUMNS": "80"}
    proc = subprocess.run(
        [BILLING, *command.split(), "--help"], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    text = " ".join(line.strip(" │") for line in proc.stdout.splitlines())
    assert "Environment:" in text
    # every variable the list names is in the help (rich may break a line after a comma, never inside a word)
    first = ENVIRONMENT[command].split()[0].strip(",;(")
    assert first in text
    assert all(len(line) <= 80 for line in proc.stdout.splitlines()), proc.stdout


def _command_names(app: typer.Typer, prefix: str = "") -> list[str]:
    names = [
        f"{prefix}{c.name or (c.callback.__name__ if c.callback else '')}" for c in app.registered_commands
    ]
    for group in app.registered_groups:
        if group.typer_instance is not None and group.name:
            names += _command_names(group.typer_instance, f"{prefix}{group.name} ")
    return names


def test_every_command_is_in_the_environment_list() -> None:
    # the list drives the test above: a command missing from it would have no "Environment:" and no test
    from billing_local.cli import app

    assert sorted(set(_command_names(app)) - set(ENVIRONMENT)) == []

"""`billing <command> --help` fits 80 columns, cuts nothing, and names the environment variables the
command reads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer._click.core import Command
from typer.core import TyperGroup as Group
from typer.core import TyperOption as Option

from billing_local.help_env import ENVIRONMENT

BILLING = str(Path(sys.executable).parent / "billing")


def _click_tree() -> dict[tuple[str, ...], Command]:
    """Every command and group of the app by its path (the root is ()), walked from click's own tree."""
    from billing_local.cli import app

    found: dict[tuple[str, ...], Command] = {}

    def walk(path: tuple[str, ...], command: Command) -> None:
        found[path] = command
        if isinstance(command, Group):
            for name, sub in command.commands.items():
                walk((*path, name), sub)

    walk((), typer.main.get_command(app))
    return found


TREE = _click_tree()


def _help_at_80(path: tuple[str, ...]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "LINES"}} | {"COLUMNS": "80"}
    proc = subprocess.run(
        [BILLING, *path, "--help"], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return proc.stdout


def _command_rows(text: str) -> dict[str, str]:
    """A group's "Commands:" section as {name: summary on one line}."""
    rows: dict[str, str] = {}
    lines = text.splitlines()
    start = lines.index("Commands:") + 1 if "Commands:" in lines else len(lines)
    name = ""
    for line in lines[start:]:
        if not line.strip():
            break
        if match := re.fullmatch(r"  (\S+)\s+(.*)", line):
            name = match[1]
            rows[name] = match[2]
        else:
            rows[name] += " " + line.strip()
    return rows


@pytest.mark.parametrize("path", sorted(TREE), ids=lambda p: " ".join(("billing", *p)))
def test_help_is_whole_at_80_columns(path: tuple[str, ...]) -> None:
    # Given a terminal 80 columns wide, when a command's help is printed
    text = _help_at_80(path)
    # then it fits and cuts nothing: no line is wider, nothing ends in "…" (rich's cut)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "…" not in text, text
    # and no hyphenated word is split across lines ("[default: no-allow-" / "rejected]", "--queue-" / "url")
    assert not [line for line in text.splitlines() if re.search(r"\w-$", line)], text
    # and every option's names are there whole (not followed by more of a name)
    command = TREE[path]
    for param in command.params:
        if isinstance(param, Option):
            for name in (*param.opts, *param.secondary_opts):
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), (name, text)
    # and a group lists every command with a whole sentence of its own help, not cut with "..."
    if isinstance(command, Group):
        rows = _command_rows(text)
        assert sorted(rows) == sorted(command.commands), text
        for name, summary in rows.items():
            own = " ".join((command.commands[name].help or "").split())
            assert summary.endswith(".") and not summary.endswith("..."), (name, summary)
            assert own.startswith(summary), (name, summary, own)


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

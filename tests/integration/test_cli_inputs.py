"""Inputs the local commands refuse before doing any work (no database, no network)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from typer.testing import CliRunner

from billing.domain.model import Period
from billing_local.cli import app


def test_seeding_an_hour_that_has_not_ended_is_a_usage_error() -> None:
    future = Period.last_complete_before(datetime.now(UTC) + timedelta(hours=3), timedelta(0))
    result = CliRunner().invoke(app, ["seed", "--end", future.isoformat()], env={"DATABASE_URL": ""})
    assert result.exit_code == 2
    assert "has not ended yet" in result.output and "Traceback" not in result.output


def test_a_timeline_of_input_without_transactions_is_an_error(tmp_path: Path) -> None:
    events = tmp_path / "events.ndjson"
    events.write_text(json.dumps({"metadata": {"service": {"name": "billing"}}}) + "\n")
    result = CliRunner().invoke(app, ["timeline", str(events), "-o", str(tmp_path / "t.html")])
    assert result.exit_code == 2
    assert "no transaction events" in " ".join(result.output.split())  # stderr wraps at 80 columns
    assert not (tmp_path / "t.html").exists()

"""Inputs the local commands refuse before doing any work (no database, no network)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.integration.test_cli_errors import _clean_env, assert_one_error, billing
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
    proc = billing("timeline", str(events), "-o", str(tmp_path / "t.html"), env=_clean_env())
    assert_one_error(proc, 2, f"{events}: no transaction events")
    assert not (tmp_path / "t.html").exists()

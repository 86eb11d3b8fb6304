"""Inputs the local commands refuse before doing any work (no database, no network)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
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


PINNED = "2026-11-30T13:20:00Z"  # BILLING_LOCAL_NOW: the local tooling's clock, never the wall clock


@pytest.mark.parametrize("command", ["run", "status"])
def test_an_hour_that_has_not_ended_is_refused_alike_by_run_and_status(command: str) -> None:
    # a future hour has no ledger yet: status must not call it "NOT CLEAN, never dispatched" (exit 1)
    env = _clean_env(BILLING_LOCAL_NOW=PINNED)
    proc = billing(command, "--period", "2027-01-01T00:00:00Z", env=env)
    assert_one_error(
        proc,
        2,
        "'--period': 2027-01-01T00:00:00Z has not ended yet (now 2026-11-30T13:20:00Z, BILLING_LOCAL_NOW)",
    )
    # the hour that ends at the pinned instant's hour is refused too: the clock is BILLING_LOCAL_NOW's
    proc = billing(command, "--period", "2026-11-30T13:00:00Z", env=env)
    assert_one_error(proc, 2, "2026-11-30T13:00:00Z has not ended yet")


@pytest.mark.parametrize(
    ("period", "message"),
    [
        ("yesterday", "'--period': 'yesterday' is not an hour: give one in UTC, e.g. 2026-11-26T13:00:00Z"),
        (
            "2026-11-30",
            "'--period': '2026-11-30' has no time zone: give the full form, e.g. 2026-11-30T00:00:00Z",
        ),
        ("2026-11-30T10:30:00+00:00", "starts on the hour, got 2026-11-30T10:30:00Z"),
    ],
)
def test_a_period_that_is_not_an_hour_is_named_with_an_example(period: str, message: str) -> None:
    proc = billing("status", "--period", period, env=_clean_env(BILLING_LOCAL_NOW=PINNED))
    text = assert_one_error(proc, 2, message)
    assert "+00:00" not in text and "isoformat" not in text


def test_seeding_a_future_hour_names_the_clock_it_was_judged_by() -> None:
    proc = billing("seed", "--end", "2026-11-30T13:00:00Z", env=_clean_env(BILLING_LOCAL_NOW=PINNED))
    assert_one_error(
        proc,
        2,
        "'--end': 2026-11-30T13:00:00Z has not ended yet (now 2026-11-30T13:20:00Z, BILLING_LOCAL_NOW)",
    )


def test_redrive_without_a_queue_on_a_stack_with_lanes_suggests_the_lane_option() -> None:
    lanes = {
        f"BILLING_{m}_DLQ_URL": f"http://127.0.0.1:9/000000000000/{m.lower()}-dlq"
        for m in ("AWS", "GCP", "AZURE")
    }
    proc = billing("redrive", env=_clean_env(**lanes))
    assert_one_error(proc, 2, "BILLING_DLQ_URL is not set", "--lane aws|gcp|azure")


def test_status_help_names_every_exit_1_condition_run_has() -> None:
    text = " ".join(CliRunner().invoke(app, ["status", "--help"]).stdout.split())
    assert "rejected, failed or expired" in text

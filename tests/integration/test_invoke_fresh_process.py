"""`billing invoke` of the sample SQS event in a fresh process, as a newcomer runs it.

A fresh process because a process has one APM agent, built by the first handler module imported: in the
pytest process the other invoke tests' agent (built with the tests' configuration) would hide what the
command itself sets up. No database is configured, so the command starts the embedded local stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
EVENT = ROOT / "events" / "sqs-one-customer.json"
BILLING = str(Path(sys.executable).parent / "billing")
_DATABASE_ENV = {"DATABASE_URL", "BILLING_DATABASE_URL", "BILLING_DATABASE_SECRET_ARN"}
# what a newcomer's shell does not set: the tests' agent configuration included
_NOT_INHERITED = _DATABASE_ENV | {"ELASTIC_APM_ENABLED", "ELASTIC_APM_TRANSPORT_CLASS"}


@dataclass(frozen=True)
class Invocation:
    returncode: int
    stdout: str
    json_lines: list[dict[str, Any]]  # the handler's log lines and EMF documents (stderr)
    stderr: str
    started_ms: int
    ended_ms: int

    def metric(self, name: str) -> float:
        (value,) = [line[name] for line in self.json_lines if "_aws" in line and name in line]
        return float(value[0] if isinstance(value, list) else value)


def invoke_sample(*extra: str) -> Invocation:
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    started_ms = int(time.time() * 1000)
    proc = subprocess.run(
        [BILLING, "invoke", "Biller", "--event", str(EVENT), "--customers", "3", *extra],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    ended_ms = int(time.time() * 1000)
    lines = []
    for line in proc.stderr.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return Invocation(proc.returncode, proc.stdout, lines, proc.stderr, started_ms, ended_ms)


@pytest.fixture(scope="module")
def sample() -> Invocation:
    return invoke_sample()


def test_the_handlers_log_lines_carry_the_transactions_trace_id(sample: Invocation) -> None:
    # Given the sample event, invoked as a newcomer would (the template's agent switch is "false")
    assert sample.returncode == 0, sample.stderr
    logs = [line for line in sample.json_lines if "elasticapm_labels" in line]
    billed = [line for line in logs if line.get("message") == "billed"]
    # Then the "billed" line names the transaction's trace id (read from the agent's own API)...
    assert len(billed) == 1, sample.stderr
    trace_id = billed[0].get("trace.id")
    assert trace_id, billed[0]
    # ...and every log line of the invocation carries it in its correlation labels, none null
    invocation = [line for line in logs if line.get("function_request_id")]
    assert invocation, sample.stderr
    for line in invocation:
        labels = line["elasticapm_labels"]
        assert labels["trace.id"] == trace_id, line
        assert labels["transaction.id"] == billed[0]["transaction.id"], line


def test_the_message_age_is_this_deliverys_not_the_event_files(sample: Invocation) -> None:
    # Given the sample event, whose SentTimestamp is a year older than its hour
    assert sample.returncode == 0, sample.stderr
    # Then the Biller's MessageAgeMs is at most the time the command took: it was delivered during it
    age = sample.metric("MessageAgeMs")
    assert 0 <= age <= sample.ended_ms - sample.started_ms
    # and the command says it set the timestamps, and how to keep the event's
    assert "--keep-timestamps" in sample.stderr


def test_keep_timestamps_keeps_the_events_send_time() -> None:
    # Given the sample event and --keep-timestamps
    sent = int(json.loads(EVENT.read_text())["Records"][0]["attributes"]["SentTimestamp"])
    kept = invoke_sample("--keep-timestamps")
    # Then the age is measured from the event's own SentTimestamp
    assert kept.returncode == 0, kept.stderr
    age = kept.metric("MessageAgeMs")
    assert kept.started_ms - sent <= age <= kept.ended_ms - sent


def test_the_agent_captures_in_memory_whatever_transport_the_template_deploys(sample: Invocation) -> None:
    # Given the template's agent settings, which select the serverless transport for the extension
    assert sample.returncode == 0, sample.stderr
    # Then the command's in-memory transport was the one used: nothing tried to reach an APM Server
    # (the template's transport would have posted to the agent's default http://localhost:8200)
    assert "Failed to submit message" not in sample.stderr
    assert "Unable to reach APM Server" not in sample.stderr

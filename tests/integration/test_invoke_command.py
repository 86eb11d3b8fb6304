"""`billing invoke`: the real handler, run in-process the way `sam local invoke` runs it.

The command runs through typer's CliRunner on an app with ``cli_invoke.register`` applied. Without a
configured database it starts the embedded local stack itself (PostgreSQL, moto, the marketplace
emulators); the stack it started is kept by a wrapper so the tests can look at what the marketplaces
received. With DATABASE_URL set (the test fixtures' stack) it uses that database and queue instead. A
probe function in a template of the test's own shows exactly what the handler sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import pytest
import typer
from typer.testing import CliRunner

import billing_local.stack
from billing_local.cli_invoke import APM_CAPTURE_TRANSPORT, register
from testkit import add_aws_customer

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "events"
CUSTOMERS = 12  # the demo customers seeded on the embedded stack: cust-000000 (aws), cust-000001 (gcp)...
_DATABASE_ENV = ("DATABASE_URL", "BILLING_DATABASE_URL", "BILLING_DATABASE_SECRET_ARN")


@pytest.fixture(autouse=True, scope="module")
def _agent_built_with_the_test_configuration() -> None:
    """A process has one APM agent, built by the first handler module imported: let it be the tests'.

    Otherwise the first `billing invoke` here would build it from template.yaml's environment (the agent
    off, as deployed without the extension) and every APM test running later would capture nothing.
    """
    import biller  # noqa: F401


def invoke_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """The billing command line, reduced to `invoke`."""

    register(app)
    return app


def run(*args: object) -> Any:
    return CliRunner().invoke(invoke_app(), [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def embedded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """No database configured, so the command starts the embedded stack; yields the stacks it started."""
    for name in _DATABASE_ENV:
        monkeypatch.delenv(name, raising=False)
    started: list[Any] = []
    original = billing_local.stack.local_stack

    @contextlib.contextmanager
    def keeping(database_url: str | None = None, **options: Any) -> Iterator[Any]:
        with original(database_url, **options) as stack:
            started.append(stack)
            yield stack

    monkeypatch.setattr(billing_local.stack, "local_stack", keeping)
    yield started


def test_biller_bills_the_events_customer_on_the_embedded_stack(embedded: list[Any]) -> None:
    # Given no database configured, and the sample event billing cust-000000 for 2026-11-26T13:00Z
    # When the Biller is invoked with it
    result = run("invoke", "Biller", "--event", EVENTS / "sqs-one-customer.json", "--customers", CUSTOMERS)
    # Then it printed the handler's response: no failed item
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"batchItemFailures": []}
    # and the customer's hour reached AWS Marketplace (the emulator), accepted inside its window
    (stack,) = embedded
    accepted = stack.metering.accepted()
    assert {r.customer for r in accepted} == {"aws-cust-000000"}
    assert {r.dimension for r in accepted} == {
        "CapacityGbHours",
        "DataTransferGb",
        "SnapshotStorage100GbHours",
    }
    assert {r.timestamp.isoformat() for r in accepted} == {"2026-11-26T13:00:00+00:00"}


def test_biller_fails_only_the_poison_record_of_a_batch(embedded: list[Any]) -> None:
    # Given a batch of an AWS customer, a body that is not a bill message, and a Google customer
    # When the Biller is invoked with it
    result = run("invoke", "Biller", "--event", EVENTS / "sqs-several.json", "--customers", CUSTOMERS)
    # Then only the poison record is reported failed, and both customers were billed
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "batchItemFailures": [{"itemIdentifier": "0f8d3a5e-1c7b-4e8e-9a64-000000000002"}]
    }
    (stack,) = embedded
    assert {r.customer for r in stack.metering.accepted()} == {"aws-cust-000000"}
    assert stack.gcp.records and all(
        r.consumer_id == "project_number:100001" for r in stack.gcp.records.values()
    )


def test_dispatcher_prints_the_dispatch_of_a_backfill(embedded: list[Any]) -> None:
    # Given no database configured
    # When the Dispatcher is invoked with the backfill of 2026-11-26T13:00Z
    result = run("invoke", "Dispatcher", "--event", EVENTS / "backfill.json", "--customers", CUSTOMERS)
    # Then it printed the dispatch: every seeded customer queued once for that hour
    assert result.exit_code == 0, result.output
    response = json.loads(result.stdout)
    assert response | {"run_id": "-"} == {
        "run_id": "-",
        "period": "2026-11-26T13:00:00Z",
        "dispatched": CUSTOMERS,
        "already_dispatched": False,
        "resent": 0,
    }
    assert len(embedded) == 1


def test_a_configured_database_is_used_with_the_env_vars_file(
    stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given DATABASE_URL and the queue in the environment (the test fixtures' stack), three customers,
    # and an env-vars file setting a 30-minute settle delay for every function
    async def seed() -> None:
        pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=1)
        for i in range(3):
            await add_aws_customer(pool, f"cust-{i:06d}")
        await pool.close()

    asyncio.run(seed())
    env_vars = tmp_path / "env.json"
    env_vars.write_text(json.dumps({"Parameters": {"BILLING_SETTLE_DELAY_MINUTES": 30}}))

    def no_stack(*_: Any) -> Any:
        raise AssertionError("the embedded stack must not start when a database is configured")

    monkeypatch.setattr(billing_local.stack, "local_stack", no_stack)
    # When the Dispatcher is invoked with the scheduled event of 14:05
    result = run("invoke", "Dispatcher", "--event", EVENTS / "scheduled.json", "--env-vars", env_vars)
    # Then it dispatched 12:00 (14:05 less 30 minutes is 13:35: the last complete hour is 12:00) to the queue
    assert result.exit_code == 0, result.output
    response = json.loads(result.stdout)
    assert (response["period"], response["dispatched"]) == ("2026-11-26T12:00:00Z", 3)
    queued = boto3.client("sqs").receive_message(QueueUrl=stack.queues.url, MaxNumberOfMessages=10)
    assert len(queued["Messages"]) == 3


# --- what the handler sees: a probe function ------------------------------------------------------

PROBE = """
import os
import sys

print("the probe's init writes to stdout")
INIT_ENV = dict(os.environ)
if INIT_ENV.get("PROBE_FAIL_INIT"):
    raise RuntimeError("init failed")


def handler(event, context):
    if os.environ.get("PROBE_RAISE"):
        raise ValueError("the probe raised")
    names = ("FROM_TEMPLATE", "OVERRIDDEN", "FLAG", "ONLY_BILLER", "EXTRA", "UNRESOLVED",
             "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_VERSION", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
             "AWS_LAMBDA_FUNCTION_TIMEOUT", "AWS_LAMBDA_FUNCTION_HANDLER", "AWS_EXECUTION_ENV",
             "LAMBDA_TASK_ROOT", "AWS_REGION", "AWS_SAM_LOCAL", "ELASTIC_APM_TRANSPORT_CLASS")
    return {
        "event": event,
        "init_env": {name: INIT_ENV.get(name) for name in names},
        "code_on_path": INIT_ENV["LAMBDA_TASK_ROOT"] in sys.path,
        "context": {
            "function_name": context.function_name,
            "function_version": context.function_version,
            "invoked_function_arn": context.invoked_function_arn,
            "memory_limit_in_mb": context.memory_limit_in_mb,
            "log_group_name": context.log_group_name,
            "has_request_id": bool(context.aws_request_id),
            "time_left_s": round(context.get_remaining_time_in_millis() / 1000),
        },
    }
"""

PROBE_TEMPLATE = """
AWSTemplateFormatVersion: "2010-09-09"
Transform: AWS::Serverless-2016-10-31
Parameters:
  Flag:
    Type: String
    Default: "true"
  Unknown:
    Type: String
Globals:
  Function:
    Runtime: python3.13
    Timeout: 30
    MemorySize: 256
    Environment:
      Variables:
        FROM_TEMPLATE: template
        OVERRIDDEN: template
        FLAG: !Ref Flag
        UNRESOLVED: !Ref Unknown
Resources:
  BillerFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: probe/
      Handler: probe.handler
      Environment:
        Variables:
          ONLY_BILLER: biller
"""


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A template whose BillerFunction is the probe; a DATABASE_URL so no stack starts."""
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "probe.py").write_text(textwrap.dedent(PROBE))
    (tmp_path / "template.yaml").write_text(PROBE_TEMPLATE)
    monkeypatch.setenv("DATABASE_URL", "postgresql://probe@/unused")
    monkeypatch.delenv("ELASTIC_APM_TRANSPORT_CLASS", raising=False)
    return tmp_path


def run_probe(probe: Path, env_vars: dict[str, Any]) -> Any:
    (probe / "env.json").write_text(json.dumps(env_vars))
    return run(
        "invoke", "Biller", "--template", probe / "template.yaml",
        "--event", EVENTS / "backfill.json", "--env-vars", probe / "env.json",
    )  # fmt: skip


def test_the_handler_sees_the_template_the_env_vars_file_and_lambdas_variables(probe: Path) -> None:
    # Given an env-vars file in SAM's format: "Parameters" for all, the function's own entry winning
    env_vars = {
        "Parameters": {"OVERRIDDEN": "parameters", "EXTRA": 7},
        "BillerFunction": {"OVERRIDDEN": "function"},
        "DispatcherFunction": {"OVERRIDDEN": "not this function"},
    }
    # When the probe is invoked
    result = run_probe(probe, env_vars)
    assert result.exit_code == 0, result.output
    seen = json.loads(result.stdout)
    # Then at init it saw the template's values, the overrides, and what Lambda's runtime sets
    assert seen["init_env"] == {
        "FROM_TEMPLATE": "template",
        "OVERRIDDEN": "function",
        "FLAG": "true",
        "ONLY_BILLER": "biller",
        "EXTRA": "7",
        "UNRESOLVED": None,  # a parameter without a default: only a deploy knows it
        "AWS_LAMBDA_FUNCTION_NAME": "BillerFunction",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256",
        "AWS_LAMBDA_FUNCTION_TIMEOUT": "30",
        "AWS_LAMBDA_FUNCTION_HANDLER": "probe.handler",
        "AWS_EXECUTION_ENV": "AWS_Lambda_python3.13",
        "LAMBDA_TASK_ROOT": str(probe / "probe"),
        "AWS_REGION": seen["init_env"]["AWS_REGION"],
        "AWS_SAM_LOCAL": "true",
        "ELASTIC_APM_TRANSPORT_CLASS": APM_CAPTURE_TRANSPORT,
    }
    assert seen["code_on_path"] is True
    # and a context like SAM's, with the event as given
    region = seen["init_env"]["AWS_REGION"]
    assert seen["context"] == {
        "function_name": "BillerFunction",
        "function_version": "$LATEST",
        "invoked_function_arn": f"arn:aws:lambda:{region}:123456789012:function:BillerFunction",
        "memory_limit_in_mb": 256,
        "log_group_name": "aws/lambda/BillerFunction",
        "has_request_id": True,
        "time_left_s": 30,
    }
    assert seen["event"] == {"period": "2026-11-26T13:00:00Z"}
    # The init's print went to stderr with the logs; names the template lacks are pointed out
    assert "the probe's init writes to stdout" in result.stderr
    assert "would ignore EXTRA" in result.stderr


def test_the_process_is_left_as_it_was(probe: Path) -> None:
    # Given the probe, and the process's state before
    path_before = list(sys.path)
    # When it is invoked
    assert run_probe(probe, {}).exit_code == 0
    # Then its module, code directory and variables are gone again
    assert "probe" not in sys.modules
    assert sys.path == path_before
    assert "FROM_TEMPLATE" not in __import__("os").environ


@pytest.mark.parametrize(
    ("variable", "error_type", "message", "has_request_id"),
    [
        ("PROBE_RAISE", "ValueError", "the probe raised", True),
        ("PROBE_FAIL_INIT", "RuntimeError", "init failed", False),
    ],
    ids=["handler", "init"],
)
def test_an_error_is_printed_as_lambdas_error_document_and_exits_1(
    probe: Path, variable: str, error_type: str, message: str, has_request_id: bool
) -> None:
    # Given a probe that raises in its handler or in its init
    # When it is invoked
    result = run_probe(probe, {"BillerFunction": {variable: "1"}})
    # Then the command fails with Lambda's error document
    assert result.exit_code == 1
    error = json.loads(result.stdout)
    assert (error["errorType"], error["errorMessage"]) == (error_type, message)
    assert bool(error["requestId"]) is has_request_id
    assert any("probe.py" in line for line in error["stackTrace"])


def test_an_env_vars_file_not_in_sams_format_is_refused(probe: Path) -> None:
    result = run_probe(probe, {"Parameters": ["not", "a", "mapping"]})
    assert result.exit_code == 2
    assert "--env-vars" in result.stderr


def test_an_unknown_function_is_one_usage_line_naming_every_function() -> None:
    # through the installed `billing`, as from a shell: typer converts the argument with pydantic, whose
    # message starts "Value error, "; the command line prints the problem alone
    import subprocess

    billing = str(Path(sys.executable).parent / "billing")
    result = subprocess.run(
        [billing, "invoke", "Nope", "--event", str(EVENTS / "backfill.json")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: Invalid value for 'function': 'Nope' is not one of 'Dispatcher', 'Biller', 'Subscriptions',"
        " 'Auditor'.",
        "(see `billing invoke --help`)",
    ]


def test_an_agreement_event_before_its_license_says_what_to_invoke_first(
    stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a configured database (as after `billing local up`) that has seen no event of the agreement
    def no_stack(*_: Any, **__: Any) -> Any:
        raise AssertionError("the embedded stack must not start when a database is configured")

    monkeypatch.setattr(billing_local.stack, "local_stack", no_stack)
    # When the agreement's Created event is invoked
    result = run("invoke", "Subscriptions", "--event", EVENTS / "aws-agreement-created.json")
    # Then the function failed as in Lambda (EventBridge retries), and one line says what to do
    assert result.exit_code == 1
    assert json.loads(result.stdout)["errorType"] == "UnknownAgreementError"
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("no license known for AWS agreement")]
    assert "invoke events/aws-license-updated.json first" in line
    # and once the License Updated event is in, the agreement event is recorded
    licensed = run("invoke", "Subscriptions", "--event", EVENTS / "aws-license-updated.json")
    assert licensed.exit_code == 0, licensed.output
    again = run("invoke", "Subscriptions", "--event", EVENTS / "aws-agreement-created.json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == {"recorded": 1}


def test_a_push_without_the_push_settings_says_how_to_give_them(
    stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a configured database whose environment has no Google push settings (as `billing local up`)
    for name in ("BILLING_GCP_PUSH_AUDIENCE", "BILLING_GCP_PUSH_SERVICE_ACCOUNT"):
        monkeypatch.delenv(name, raising=False)
    # When a Pub/Sub push sample is invoked
    result = run("invoke", "Subscriptions", "--event", EVENTS / "gcp-pubsub-account-active.json")
    # Then the function failed at its settings, and one line names them and the way out
    assert result.exit_code == 1
    assert json.loads(result.stdout)["errorType"] == "ValidationError"
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("the function's Google/Azure push")]
    assert "BILLING_GCP_PUSH_*" in line and "without a database configured" in line

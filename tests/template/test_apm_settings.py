"""The APM agent as template.yaml and the local runner configure it: lean spans, full error events.

The agent is the real elastic-apm with an in-memory transport (billing_local.apm_capture): every event
runs through the agent's processors and serializer as it would be posted to an APM Server.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import elasticapm
import pytest

from billing.tracing import LeanClient
from billing_local.apm_capture import CAPTURE
from billing_local.runner import APM_SETTINGS
from billing_local.template import function_config, load_template

ROOT = Path(__file__).resolve().parents[2]
# the settings that decide what a span or an error carries (the others route or silence the agent)
SHAPING = ("ELASTIC_APM_SPAN_STACK_TRACE_MIN_DURATION", "ELASTIC_APM_COLLECT_LOCAL_VARIABLES")


def _template_settings(function: str) -> dict[str, Any]:
    environment = function_config(ROOT / "template.yaml", function).environment
    shaping = [name for name in SHAPING if name in environment]
    return {name.removeprefix("ELASTIC_APM_").lower(): environment[name] for name in shaping}


def _events_of_a_slow_span_and_an_error(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One transaction with a 50 ms span (the agent's duration override) and a captured exception."""
    # A Client makes itself the process's agent; the one a handler module built is put back after.
    previous = elasticapm.get_client()
    client = LeanClient(  # what the handlers and the runner build
        service_name="apm-settings-test",
        transport_class="billing_local.apm_capture.CaptureTransport",
        metrics_interval="0ms",
        central_config=False,
        cloud_provider="none",
        **settings,
    )
    CAPTURE.reset()
    try:
        client.begin_transaction("messaging")
        with elasticapm.capture_span("SELECT FROM ledger", span_type="db", duration=0.050):
            pass
        try:
            raise RuntimeError("the marketplace refused the call")
        except RuntimeError:
            client.capture_exception(handled=True)
        client.end_transaction("RECEIVE billing", "failure")
        client._transport.flush()
        (span,) = CAPTURE.of_type("span")
        (error,) = CAPTURE.of_type("error")
        return span, error
    finally:
        client.close()
        CAPTURE.reset()
        if previous is not None:
            elasticapm.base.set_client(previous)


@pytest.mark.parametrize("function", ["Biller", "Dispatcher"])
def test_template_turns_span_stack_traces_off(function: str) -> None:
    settings = _template_settings(function)
    span, error = _events_of_a_slow_span_and_an_error(settings)
    # a 50 ms span, ten times the agent's default threshold, carries no stack trace
    assert "stacktrace" not in span
    # while the error event keeps its stack trace, without frame locals
    frames = error["exception"]["stacktrace"]
    assert frames and frames[-1]["function"] == "_events_of_a_slow_span_and_an_error"
    assert all("vars" not in frame for frame in frames)


def test_local_runner_turns_span_stack_traces_off() -> None:
    settings = {k: APM_SETTINGS[k] for k in ("span_stack_trace_min_duration", "collect_local_variables")}
    span, error = _events_of_a_slow_span_and_an_error(settings)
    assert "stacktrace" not in span
    assert error["exception"]["stacktrace"]


def test_the_agents_default_gives_the_same_span_a_stack_trace() -> None:
    # the check above can fail: without the setting, the agent traces every span of 5 ms or more
    span, error = _events_of_a_slow_span_and_an_error({"collect_local_variables": "off"})
    assert span["stacktrace"] and error["exception"]["stacktrace"]
    assert elasticapm.conf.Config().span_stack_trace_min_duration == timedelta(milliseconds=5)


@pytest.mark.parametrize(
    ("settings", "walks"),
    [({"span_stack_trace_min_duration": "-1ms"}, False), ({}, True)],
    ids=["span stack traces off", "the agent's default"],
)
def test_no_stack_walk_at_span_start_when_span_stack_traces_are_off(
    settings: dict[str, Any], walks: bool
) -> None:
    previous = elasticapm.get_client()
    client = LeanClient(
        service_name="apm-settings-test",
        transport_class="billing_local.apm_capture.CaptureTransport",
        metrics_interval="0ms",
        central_config=False,
        cloud_provider="none",
        **settings,
    )
    try:
        client.begin_transaction("messaging")
        # while a span is open, the frames collected at its start are held on it
        with elasticapm.capture_span("SELECT 1", span_type="db", leaf=True):
            span = elasticapm.traces.execution_context.get_span()
            assert bool(span.frames) is walks
        client.end_transaction("RECEIVE billing", "success")
    finally:
        client.close()
        CAPTURE.reset()
        if previous is not None:
            elasticapm.base.set_client(previous)


@pytest.mark.parametrize("function", ["Biller", "Dispatcher"])
def test_template_keeps_transaction_registration_on_unless_turned_off(
    function: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from billing.config import Settings

    # Given the function's environment as the template deploys it by default
    environment = function_config(ROOT / "template.yaml", function).environment
    monkeypatch.setenv(
        "BILLING_APM_REGISTER_TRANSACTIONS", str(environment["BILLING_APM_REGISTER_TRANSACTIONS"])
    )
    # Then the settings the handlers read at cold start keep the agent's registration on
    assert Settings().apm_register_transactions is True
    # and the parameter that turns it off exists, with "false" among its values
    parameter = load_template(ROOT / "template.yaml")["Parameters"]["ApmRegisterTransactions"]
    assert (parameter["Default"], sorted(parameter["AllowedValues"])) == ("true", ["false", "true"])


@pytest.mark.parametrize("register", [False, True])
def test_the_lambda_agent_registers_transactions_only_when_the_setting_says_so(register: bool) -> None:
    from elasticapm.contrib.serverless import aws as aws_serverless

    from billing.tracing import lambda_agent

    # capture_serverless registers each transaction while this flag of the agent's is set (its default)
    previous = aws_serverless.REGISTER_PARTIAL_TRANSACTIONS
    try:
        aws_serverless.REGISTER_PARTIAL_TRANSACTIONS = not register
        lambda_agent(register_transactions=register)
        assert aws_serverless.REGISTER_PARTIAL_TRANSACTIONS is register
    finally:
        aws_serverless.REGISTER_PARTIAL_TRANSACTIONS = previous


@pytest.mark.parametrize("function", ["Biller", "Dispatcher", "Auditor", "Subscriptions"])
def test_template_selects_the_serverless_transport(function: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from billing.apm_transport import ServerlessTransport

    # Given the function's agent settings as the template deploys them with the extension layer
    environment = function_config(ROOT / "template.yaml", function).environment
    for name in ("ELASTIC_APM_TRANSPORT_CLASS", "ELASTIC_APM_SKIP_SERVER_INFO"):
        monkeypatch.setenv(name, str(environment[name]))
    previous = elasticapm.get_client()
    threads = set(threading.enumerate())
    # When the handlers' agent is built (capture_serverless's settings, the extension's address)
    client = LeanClient(
        service_name="apm-settings-test",
        server_url="http://localhost:8200",
        metrics_interval="0ms",
        central_config=False,
        cloud_provider="none",
    )
    try:
        # Then its transport posts each invocation's events from the flushing thread: no sender thread
        assert type(client._transport) is ServerlessTransport
        assert set(threading.enumerate()) == threads
        # which never asks the APM Server's version, as the template says
        assert client.config.skip_server_info is True
    finally:
        client.close()
        if previous is not None:
            elasticapm.base.set_client(previous)


@pytest.mark.parametrize("function", ["Biller", "Dispatcher", "Auditor", "Subscriptions"])
def test_template_and_runner_serialize_events_with_orjson(
    function: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from billing import apm_json

    # Given the function's serializer setting as the template deploys it (and the runner's own)
    environment = function_config(ROOT / "template.yaml", function).environment
    monkeypatch.setenv(
        "ELASTIC_APM_TRANSPORT_JSON_SERIALIZER", str(environment["ELASTIC_APM_TRANSPORT_JSON_SERIALIZER"])
    )
    assert APM_SETTINGS["transport_json_serializer"] == environment["ELASTIC_APM_TRANSPORT_JSON_SERIALIZER"]
    previous = elasticapm.get_client()
    # When the agent is built
    client = LeanClient(service_name="apm-settings-test", metrics_interval="0ms", central_config=False)
    try:
        # Then its transport writes every event with billing.apm_json, not the agent's encoder
        assert client._transport._json_serializer is apm_json.dumps
    finally:
        client.close()
        if previous is not None:
            elasticapm.base.set_client(previous)

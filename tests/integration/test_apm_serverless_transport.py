"""The serverless transport (billing.apm_transport): each invocation's events posted by the flushing thread.

The real elastic-apm agent (the project's LeanClient) with the transport, posting over real HTTP to
an HTTP double of the APM Lambda extension (billing_local.emulators.apm_extension, which follows
elastic/apm-aws-lambda's receiver: intake, ``?flushed=true``, transaction registration).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import elasticapm
import pytest

from billing.apm_transport import ServerlessTransport
from billing.tracing import LeanClient
from billing_local.emulators.apm_extension import ApmExtension, apm_extension

TRANSPORT = "billing.apm_transport.ServerlessTransport"


@pytest.fixture
def extension() -> Iterator[tuple[str, ApmExtension]]:
    with apm_extension() as served:
        yield served


def _client(server_url: str, transport_class: str = TRANSPORT, **settings: Any) -> Any:
    settings = {"metrics_sets": [], **settings}
    return LeanClient(  # what the handlers build, settings as template.yaml's and capture_serverless's
        server_url=server_url,
        transport_class=transport_class,
        metrics_interval="0ms",
        breakdown_metrics=False,
        central_config=False,
        cloud_provider="none",
        span_compression_enabled=False,
        span_stack_trace_min_duration="-1ms",
        collect_local_variables="off",
        skip_server_info=True,
        **settings,
    )


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Builds clients for a test; each is closed after it and the process's agent put back."""
    # the agent's environment variables win over its inline settings: the tests' in-memory transport
    # (tests/conftest.py) would be the one built
    monkeypatch.delenv("ELASTIC_APM_TRANSPORT_CLASS")
    previous = elasticapm.get_client()
    built: list[Any] = []

    def build(server_url: str, transport_class: str = TRANSPORT, **settings: Any) -> Any:
        client = _client(server_url, transport_class, **settings)
        built.append(client)
        return client

    yield build
    for client in built:
        client.close()
    if previous is not None:
        elasticapm.base.set_client(previous)


def _invocation(client: Any, *, error: bool = False) -> dict[str, str]:
    """One Lambda-shaped transaction: two spans and, if asked, an error captured in it."""
    transaction = client.begin_transaction("messaging")
    with elasticapm.capture_span("SELECT FROM ledger", span_type="db", span_subtype="postgresql"):
        pass
    with elasticapm.capture_span("BatchMeterUsage", span_type="aws", span_subtype="marketplace metering"):
        pass
    if error:
        try:
            raise RuntimeError("the marketplace refused the call")
        except RuntimeError:
            client.capture_exception(handled=True)
    client.end_transaction("RECEIVE billing", "success")
    return {"transaction": transaction.id, "trace": transaction.trace_parent.trace_id}


def record_senders(client: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads that make the transport's requests (whichever thread calls send), in
    the order they make them."""
    senders: list[str] = []
    send = client._transport.send

    def recording_send(*args: Any, **kwargs: Any) -> Any:
        senders.append(threading.current_thread().name)
        return send(*args, **kwargs)

    monkeypatch.setattr(client._transport, "send", recording_send)
    return senders


def test_the_flush_posts_every_event_from_the_calling_thread_ending_the_invocation(
    extension: tuple[str, ApmExtension], agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, double = extension
    threads_before = {t.ident for t in threading.enumerate()}
    client = agent(url)
    senders = record_senders(client, monkeypatch)
    # Given an invocation's transaction with its spans and an error, ended
    ids = _invocation(client, error=True)
    # Then nothing was sent while it ran, and the agent started no thread of its own
    assert double.counts["intake"] == 0
    assert {t.ident for t in threading.enumerate()} == threads_before
    # When the invocation's end flushes (capture_serverless calls the transport's flush)
    client._transport.flush()
    # Then one request, made by this thread, carried everything and told the extension it was the last
    assert senders == [threading.current_thread().name]
    (request,) = double.intake
    assert request.flushed and request.path == "/intake/v2/events"
    assert request.content_type == "application/x-ndjson"
    # the metadata line first (the extension keeps the first line of a body as the metadata)
    assert list(request.events[0]) == ["metadata"]
    assert request.events[0]["metadata"]["service"]["name"] == client.config.service_name
    assert sorted(next(iter(e)) for e in request.events[1:]) == ["error", "span", "span", "transaction"]
    (transaction,) = request.of_type("transaction")
    assert transaction["id"] == ids["transaction"]
    assert {s["name"] for s in request.of_type("span")} == {"SELECT FROM ledger", "BatchMeterUsage"}
    assert {s["transaction_id"] for s in request.of_type("span")} == {ids["transaction"]}
    (error,) = request.of_type("error")
    assert (error["transaction_id"], error["exception"]["type"]) == (ids["transaction"], "RuntimeError")
    # uncompressed to the extension on loopback, which takes any encoding
    assert request.content_encoding is None


def test_the_agents_own_transport_posts_from_its_sender_thread(
    extension: tuple[str, ApmExtension], agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the check above can fail: the agent's default transport posts the same flush from its thread
    url, double = extension
    client = agent(url, "elasticapm.transport.http.Transport")
    senders = record_senders(client, monkeypatch)
    _invocation(client)
    client._transport.flush()
    assert senders == ["eapm event processor thread"]
    assert double.intake[-1].flushed and double.intake[-1].content_encoding == "gzip"


def test_an_unhandled_error_is_sent_with_its_transaction_in_the_invocations_last_request(
    extension: tuple[str, ApmExtension], agent: Any
) -> None:
    url, double = extension
    client = agent(url)
    # Given an invocation that ends with an unhandled error (the agent asks its transport to flush)
    transaction = client.begin_transaction("messaging")
    try:
        raise ValueError("bad message")
    except ValueError:
        client.capture_exception(handled=False)
    # Then nothing is posted before the transaction has ended
    assert double.counts["intake"] == 0
    client.end_transaction("RECEIVE billing", "failure")
    client._transport.flush()
    # and the error and its transaction arrive together, flushed=true: the extension is not told the
    # invocation was done before its transaction arrived
    (request,) = double.intake
    assert request.flushed
    assert [e["id"] for e in request.of_type("transaction")] == [transaction.id]
    assert [e["transaction_id"] for e in request.of_type("error")] == [transaction.id]


def test_metrics_collected_at_the_invocations_end_go_in_its_last_request(
    extension: tuple[str, ApmExtension], agent: Any
) -> None:
    url, double = extension
    # Given an agent with a metric set (capture_serverless turns them off unless ELASTIC_APM_METRICS_SETS)
    client = agent(url, metrics_sets=["elasticapm.metrics.sets.cpu.CPUMetricSet"])
    ids = _invocation(client)
    # When the invocation ends as capture_serverless ends it: metrics collected, then the flush
    client.metrics.collect()
    client._transport.flush()
    # Then the metric set travels with the transaction in the one last request
    (request,) = double.intake
    assert request.flushed
    assert [t["id"] for t in request.of_type("transaction")] == [ids["transaction"]]
    assert any("system.cpu.total.norm.pct" in m["samples"] for m in request.of_type("metricset"))


@pytest.mark.parametrize("limit", ["api_request_time", "events"])
def test_events_past_the_agents_limits_are_sent_before_the_flush_without_ending_the_invocation(
    limit: str, extension: tuple[str, ApmExtension], agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from billing import apm_transport

    url, double = extension
    now = [1000.0]
    monkeypatch.setattr(apm_transport, "monotonic", lambda: now[0])
    client = agent(url, api_request_time="10s")
    client.begin_transaction("request")
    # Given a long invocation (a dispatcher's thousands of sends) whose events reach the agent's limits
    spans = apm_transport.QUEUE_CHILL_COUNT if limit == "events" else 2
    for i in range(spans):
        if limit == "api_request_time" and i == spans - 1:
            now[0] += 10.0  # the agent's api_request_time since the first buffered event
        with elasticapm.capture_span(f"SendMessageBatch {i}", span_type="messaging"):
            pass
    # Then they were posted as they came due, by this thread, without telling the extension it is done
    (early,) = double.intake
    assert not early.flushed and len(early.of_type("span")) == spans
    assert list(early.events[0]) == ["metadata"]
    # and the invocation's end posts the rest with flushed=true
    client.end_transaction("dispatch", "success")
    client._transport.flush()
    assert [r.flushed for r in double.intake] == [False, True]
    assert [len(r.of_type("transaction")) for r in double.intake] == [0, 1]


def test_an_invocation_with_nothing_to_send_still_tells_the_extension_it_is_done(
    extension: tuple[str, ApmExtension], agent: Any
) -> None:
    url, double = extension
    client = agent(url)
    client._transport.flush()
    (request,) = double.intake
    assert request.flushed and request.events == []


def test_invocations_share_one_kept_alive_connection_and_survive_the_extension_closing_it(
    agent: Any,
) -> None:
    # Given two invocations sent to the extension on one connection
    with apm_extension() as (url, double):
        client = agent(url)
        for _ in range(2):
            _invocation(client)
            client._transport.flush()
        assert double.counts["intake"] == 2
        connection = client._transport._connection
        assert connection is not None and connection.sock is not None
        port = int(url.rsplit(":", 1)[1])
    # When the extension goes away, closing that connection, and comes back on the same port (as
    # between two invocations of a frozen environment, an idle connection can be closed)
    with apm_extension(port=port) as (_, double):
        ids = _invocation(client)
        client._transport.flush()
        # Then the invocation's events arrive on a new connection, none lost on the closed one
        (request,) = double.intake
        assert [t["id"] for t in request.of_type("transaction")] == [ids["transaction"]]


@pytest.mark.parametrize("failure", ["the extension answers 503", "nothing listens"])
def test_a_failed_send_is_logged_and_never_raised_into_the_handler(
    failure: str, agent: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with contextlib.ExitStack() as served:
        url, double = served.enter_context(apm_extension())
        double.intake_status = 503
        if failure == "nothing listens":
            served.close()  # the extension is gone: its port refuses connections
        client = agent(url)
        # Given an invocation's events
        _invocation(client)
        # When the flush cannot deliver them, it returns (capture_serverless would return the response)
        with caplog.at_level(logging.ERROR, logger="elasticapm.transport"):
            client._transport.flush()
        # Then the failure is logged as the agent logs it, and counted for its back-off
        (record,) = [r for r in caplog.records if r.name == "elasticapm.transport"]
        assert record.levelno == logging.ERROR
        assert record.getMessage().startswith("Failed to submit message")
        assert ("HTTP 503" in record.getMessage()) is (failure == "the extension answers 503")
        assert client._transport.state.did_fail()


def test_a_registration_the_extension_refuses_fails_as_the_agent_expects(
    extension: tuple[str, ApmExtension], agent: Any
) -> None:
    # capture_serverless stops registering transactions when the send fails with "HTTP 4xx/5xx"
    from elasticapm.transport.exceptions import TransportException

    url, double = extension
    transport: ServerlessTransport = agent(url)._transport
    with pytest.raises(TransportException, match=r"^HTTP 415"):
        transport.send("{}", custom_url=f"{url}/register/transaction", custom_headers={"x": "y"})
    transport.send(
        '{"metadata": {}}\n',
        custom_url=f"{url}/register/transaction",
        custom_headers={
            "x-elastic-aws-request-id": "req-1",
            "Content-Type": "application/vnd.elastic.apm.transaction+ndjson",
        },
    )
    assert double.counts["register"] == 1


def test_a_request_for_another_server_goes_there_not_down_the_kept_alive_connection(
    extension: tuple[str, ApmExtension], agent: Any
) -> None:
    url, double = extension
    transport: ServerlessTransport = agent(url)._transport
    with apm_extension() as (other_url, other):
        transport.send(
            '{"metadata": {}}\n',
            custom_url=f"{other_url}/register/transaction",
            custom_headers={
                "x-elastic-aws-request-id": "req-1",
                "Content-Type": "application/vnd.elastic.apm.transaction+ndjson",
            },
        )
    assert (double.counts["register"], other.counts["register"]) == (0, 1)

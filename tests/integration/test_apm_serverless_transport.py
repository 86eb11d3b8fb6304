"""The serverless transport (billing.apm_transport): each invocation's events posted by the flushing thread.

The real elastic-apm agent (the project's LeanClient) with the transport, posting over real HTTP to
an HTTP double of the APM Lambda extension (billing_local.emulators.apm_extension, which follows
elastic/apm-aws-lambda's receiver: intake, ``?flushed=true``, transaction registration).

The transport writes a request to the extension and reads its answer before the next one: a flush
returns before the double has handled the request, so a test waits for the double (``wait_for``)
before it reads what the double kept.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import elasticapm
import pytest
from elasticapm import capture_serverless
from elasticapm.contrib.serverless import aws as aws_serverless

from billing.apm_transport import ServerlessTransport
from billing.tracing import LeanClient
from billing_local.emulators.apm_extension import ApmExtension, apm_extension
from billing_local.lambda_shapes import LambdaContext

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


@pytest.fixture
def lambda_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What capture_serverless needs to register transactions: the extension's APM Server set, and
    its module flag on (restored after the test: a refusal clears it for the process)."""
    monkeypatch.setenv("ELASTIC_APM_LAMBDA_APM_SERVER", "https://apm.invalid")
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "billing-biller")
    monkeypatch.setattr(aws_serverless, "REGISTER_PARTIAL_TRANSACTIONS", True)


def _lambda_handler() -> Callable[[dict[str, Any], Any], dict[str, bool]]:
    """A handler wrapped as the functions wrap theirs, with the process's agent (the last built):
    each invocation registers its transaction, records a span, and flushes."""

    @capture_serverless
    def handler(event: dict[str, Any], context: Any) -> dict[str, bool]:
        with elasticapm.capture_span("SELECT FROM ledger", span_type="db", span_subtype="postgresql"):
            pass
        return {"billed": True}

    return handler  # type: ignore[no-any-return]


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
    assert double.wait_for("intake", 1)
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
    assert double.wait_for("intake", 1)
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
    assert double.wait_for("intake", 1)
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
    assert double.wait_for("intake", 1)
    (early,) = double.intake
    assert not early.flushed and len(early.of_type("span")) == spans
    assert list(early.events[0]) == ["metadata"]
    # and the invocation's end posts the rest with flushed=true
    client.end_transaction("dispatch", "success")
    client._transport.flush()
    assert double.wait_for("intake", 2)
    assert [r.flushed for r in double.intake] == [False, True]
    assert [len(r.of_type("transaction")) for r in double.intake] == [0, 1]


def test_an_invocation_with_nothing_to_send_still_tells_the_extension_it_is_done(
    extension: tuple[str, ApmExtension], agent: Any
) -> None:
    url, double = extension
    client = agent(url)
    client._transport.flush()
    assert double.wait_for("intake", 1)
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
        assert double.wait_for("intake", 2)
        connection = client._transport._connection
        assert connection is not None and connection.sock is not None
        port = int(url.rsplit(":", 1)[1])
    # When the extension goes away, closing that connection (after its last answer, which the
    # transport has not read yet), and comes back on the same port (as between two invocations of
    # a frozen environment, an idle connection can be closed)
    with apm_extension(port=port) as (_, double):
        ids = _invocation(client)
        client._transport.flush()
        # Then the invocation's events arrive on a new connection, none lost on the closed one
        assert double.wait_for("intake", 1)
        (request,) = double.intake
        assert [t["id"] for t in request.of_type("transaction")] == [ids["transaction"]]


def test_a_send_that_cannot_reach_the_extension_is_logged_and_never_raised_into_the_handler(
    agent: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with apm_extension() as (url, _):
        pass  # the extension is gone: its port refuses connections
    client = agent(url)
    # Given an invocation's events
    _invocation(client)
    # When the flush cannot deliver them, it returns (capture_serverless would return the response)
    with caplog.at_level(logging.ERROR, logger="elasticapm.transport"):
        client._transport.flush()
    # Then the failure is logged as the agent logs it, and counted for its back-off
    (record,) = _failures(caplog)
    assert record.getMessage().startswith("Failed to submit message: 'Unable to reach APM Server")
    assert client._transport.state.did_fail()


def _failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "elasticapm.transport" and r.levelno == logging.ERROR]


@pytest.mark.parametrize(
    ("status", "message"),
    [(500, "HTTP 500: ok"), (503, "HTTP 503: ok"), (429, "Temporarily rate limited: ok")],
)
def test_an_intake_answer_of_400_or_more_is_logged_as_a_failure_by_the_next_request(
    status: int,
    message: str,
    extension: tuple[str, ApmExtension],
    agent: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, double = extension
    double.intake_status = status
    client = agent(url)
    transport: ServerlessTransport = client._transport
    with caplog.at_level(logging.ERROR, logger="elasticapm.transport"):
        # Given an invocation whose flush the extension answers with a failure
        _invocation(client)
        transport.flush()
        # Then the flush returned without reading that answer: nothing raised, nothing counted yet
        assert double.wait_for("intake", 1)
        assert _failures(caplog) == [] and not transport.state.did_fail()
        # When the next invocation makes its first request (here, its flush)
        ids = _invocation(client)
        transport.flush()
    # Then the first answer is logged as the agent logs a failure, and counted for its back-off
    (record,) = _failures(caplog)
    assert record.getMessage() == f"Failed to submit message: {message!r}"
    assert transport.state.did_fail()
    # and the next invocation's events were sent all the same
    assert double.wait_for("intake", 2)
    assert [t["id"] for t in double.intake[1].of_type("transaction")] == [ids["transaction"]]


def test_the_agents_back_off_counts_each_failed_answer_as_if_read_when_its_request_was_made(
    extension: tuple[str, ApmExtension],
    agent: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from elasticapm.transport import base

    now = [100.0]

    def clock() -> float:  # the agent's back-off clock (TransportState reads timeit.default_timer)
        now[0] += 1e-6  # a real clock has moved on by the time it is read again
        return now[0]

    monkeypatch.setattr(base, "timeit", SimpleNamespace(default_timer=clock))
    url, double = extension
    double.intake_status = 500
    client = agent(url)
    transport: ServerlessTransport = client._transport
    # Given an extension that fails every intake request, and three invocations 10 ms apart
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            now[0] += 0.01
            _invocation(client)
            transport.flush()
    # Then the back-off is the agent's: after the first failure it tries again at once, after the
    # second it waits a second, so the third invocation's events are dropped, not sent (an answer
    # counted as a success when its request was written would reset the back-off every time)
    assert double.wait_for("intake", 2)
    assert "dropping flushed data due to transport failure back-off" in caplog.text
    assert [len(_failures(caplog)), transport.state.retry_number] == [2, 1]
    # When the back-off has passed and the extension is well again
    double.intake_status = 202
    now[0] += 1.5
    for _ in range(2):
        _invocation(client)
        transport.flush()
    # Then the fourth invocation is sent, and its answer, read by the fifth, ends the back-off
    assert double.wait_for("intake", 4)
    assert not transport.state.did_fail()
    assert double.counts["intake"] == 4


def test_an_answer_left_unread_is_read_at_close_and_a_failure_logged(
    extension: tuple[str, ApmExtension], agent: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url, double = extension
    double.intake_status = 500
    client = agent(url)
    # Given the last invocation of an environment, its flush answered with a failure
    _invocation(client)
    client._transport.flush()
    # When the process ends (the agent's atexit hook closes the client and so the transport)
    with caplog.at_level(logging.ERROR, logger="elasticapm.transport"):
        client.close()
    # Then the answer was read: its failure logged, and the extension had handled the request
    (record,) = _failures(caplog)
    assert record.getMessage() == "Failed to submit message: 'HTTP 500: ok'"
    assert double.counts["intake"] == 1


def _registration(transport: ServerlessTransport, url: str, request_id: str = "req-1") -> Any:
    """The registration ``capture_serverless.send_partial_transaction`` sends."""
    return transport.send(
        '{"metadata": {}}\n{"transaction": {}}',
        custom_url=f"{url}/register/transaction",
        custom_headers={
            "x-elastic-aws-request-id": request_id,
            "Content-Type": "application/vnd.elastic.apm.transaction+ndjson",
        },
    )


def _returns_while_held(call: Any, timeout: float = 20.0) -> bool:
    """Whether ``call()`` returned within ``timeout`` seconds (a call still waiting is left to finish
    once the test releases what it waits for)."""
    returned = threading.Event()

    def run() -> None:
        call()
        returned.set()

    thread = threading.Thread(target=run, name="invocation", daemon=True)
    thread.start()
    return returned.wait(timeout)


def test_the_flush_returns_while_the_extension_holds_its_answer(
    extension: tuple[str, ApmExtension], agent: Any, lambda_env: None
) -> None:
    url, double = extension
    # the agent's socket timeout outlasts the test's wait: a flush that reads the answer blocks
    client = agent(url, server_timeout="120s")
    handler = _lambda_handler()
    released = threading.Event()
    double.hold["intake"] = released  # the extension answers the flush only when the test says so
    try:
        # When an invocation (registration, its work, the flush) runs
        returned = _returns_while_held(lambda: handler({}, LambdaContext.of(request_id="req-1")))
        # Then it returned while the extension still held the flush's answer: the flush was
        # delivered, and the invocation did not wait to read the answer
        assert returned, "the invocation waited for the extension's answer to its flush"
        assert double.wait_for("intake", 1) and double.intake[0].flushed
    finally:
        released.set()
    # When the next invocation runs, that answer is read first: a success, nothing lost
    handler({}, LambdaContext.of(request_id="req-2"))
    assert double.wait_for("intake", 2)
    assert double.counts["register"] == 2
    assert not client._transport.state.did_fail()


def test_the_registration_returns_while_the_extension_holds_its_answer(
    extension: tuple[str, ApmExtension], agent: Any
) -> None:
    url, double = extension
    transport: ServerlessTransport = agent(url, server_timeout="120s")._transport
    released = threading.Event()
    double.hold["register"] = released
    try:
        # When the invocation's start registers its transaction (capture_serverless's send)
        returned = _returns_while_held(lambda: _registration(transport, url))
        # Then the send returned while the extension still held its answer, the registration delivered
        assert returned, "the registration waited for the extension's answer"
        assert double.wait_for("register", 1)
    finally:
        released.set()
    # and the invocation's flush reads that answer (a success) before it is sent
    transport.flush()
    assert double.wait_for("intake", 1)
    assert aws_serverless.REGISTER_PARTIAL_TRANSACTIONS


@pytest.mark.parametrize(("status", "stops"), [(415, True), (500, True), (429, False)])
def test_a_registration_the_extension_refuses_stops_later_registrations(
    status: int,
    stops: bool,
    extension: tuple[str, ApmExtension],
    agent: Any,
    lambda_env: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, double = extension
    double.register_status = status  # e.g. an extension without /register/transaction
    client = agent(url)
    handler = _lambda_handler()
    # When three invocations run, the extension refusing their registration
    with caplog.at_level(logging.INFO, logger="elasticapm.serverless"):
        for i in range(3):
            assert handler({}, LambdaContext.of(request_id=f"req-{i}")) == {"billed": True}
    assert double.wait_for("intake", 3)
    # Then, as capture_serverless decides when the registration's send raises "HTTP 4xx/5xx", a
    # refusal stops registrations: the first answer, read by the first invocation's flush, stopped
    # the next two; a 429 ("Temporarily rate limited") is only logged, and registrations go on
    assert double.counts["refused"] == (1 if stops else 3)
    assert aws_serverless.REGISTER_PARTIAL_TRANSACTIONS is not stops
    told = [r.getMessage() for r in caplog.records if r.name == "elasticapm.serverless"]
    if stops:
        assert told == [
            "APM Lambda Extension does not support partial transactions. "
            "Disabling partial transaction registration."
        ]
    else:
        assert (
            told
            == ["Failed to send partial transaction to APM Lambda Extension: Temporarily rate limited: "] * 3
        )
    # and a registration's answer does not count for the intake's back-off
    assert not client._transport.state.did_fail()
    assert double.counts["flushed"] == 3


@pytest.mark.parametrize("close_connections", [False, True])
def test_every_invocations_registration_and_events_arrive(
    close_connections: bool, extension: tuple[str, ApmExtension], agent: Any, lambda_env: None
) -> None:
    url, double = extension
    # Given an extension that keeps the connection alive, or closes it after every answer
    # (Connection: close)
    double.close_connections = close_connections
    client = agent(url)
    handler = _lambda_handler()
    # When twenty invocations run
    for i in range(20):
        handler({}, LambdaContext.of(request_id=f"req-{i}"))
    client.close()
    # Then each registered its transaction and sent it with its span, once, in order, none lost
    assert double.wait_for("intake", 20)
    registered = [(r.of_type("transaction")[0]["id"]) for r in double.registrations]
    sent = [t["id"] for r in double.intake for t in r.of_type("transaction")]
    assert len(registered) == 20 and sent == registered
    assert [len(r.of_type("span")) for r in double.intake] == [1] * 20
    assert double.counts["flushed"] == 20 and double.counts["refused"] == 0
    assert not client._transport.state.did_fail()


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

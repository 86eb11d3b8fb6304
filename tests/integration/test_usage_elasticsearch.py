"""The Elasticsearch usage source, built by the composition root, against an HTTP double of Elasticsearch.

The server (tests/es_double.py) is an HTTP double that follows the documented ``_search`` API:
compatibility media types, ``X-Elastic-Product``, API-key authentication, the bool/term/range query,
``date_histogram`` / ``terms`` / ``sum`` aggregations computed over in-memory documents in the documented
response shape, shard failures and ``allow_partial_search_results``, and Elasticsearch's error bodies.
Anything it does not implement is a 400, never a silently wrong answer. The source under test is the real
``ElasticsearchUsageSource`` with the real ``AsyncElasticsearch`` client, made by ``Runtime`` from the
environment exactly as in Lambda, talking HTTP to the double.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from billing.adapters.usage_elasticsearch import MAX_METRICS
from billing.bootstrap import Runtime
from billing.config import load_settings
from billing.domain.errors import ConfigurationError, TransientError
from billing.domain.model import UsageTotal
from billing_local.emulators.server import BackgroundServer
from es_double import EsState, api_key, create_app

API_KEY = api_key("usage-reader", "s3cret-value")
INDEX = "usage-2026.11.26"
START = datetime(2026, 11, 26, 13, tzinfo=UTC)
END = START + timedelta(hours=2)
# AsyncElasticsearch's defaults as Runtime builds it: up to 3 retries on 429/502/503/504, no backoff
CLIENT_ATTEMPTS = 4

Source = Callable[..., Awaitable[Any]]


@dataclass
class Es:
    state: EsState
    url: str


@pytest.fixture
def es() -> Iterator[Es]:
    """The Elasticsearch double, with security on: only API_KEY may search."""
    state = EsState(api_keys={API_KEY})
    with BackgroundServer(create_app(state)) as server:
        yield Es(state, server.url)


@pytest.fixture
async def open_source(es: Es, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Source]:
    """Builds the usage source through Runtime from BILLING_* variables; extra variables override."""
    runtimes: list[Runtime] = []

    async def open_(**env: str) -> Any:
        settings = {
            "BILLING_USAGE_SOURCE": "elasticsearch",
            "BILLING_ES_URL": es.url,
            "BILLING_ES_API_KEY": API_KEY,
            "BILLING_ES_INDEX": "usage-*",
            **env,
        }
        for key, value in settings.items():
            monkeypatch.setenv(key, value)
        runtime = Runtime(load_settings())
        runtimes.append(runtime)
        return await runtime.usage_source()

    yield open_
    for runtime in runtimes:
        await runtime.close()


def doc(
    at: datetime, metric: str, quantity: float | str, customer: str = "c1", cluster: str = "k1"
) -> dict[str, Any]:
    """A usage document as the collectors write it."""
    return {
        "@timestamp": at.isoformat().replace("+00:00", "Z"),
        "customer_id": customer,
        "cluster_id": cluster,
        "metric": metric,
        "quantity": quantity,
    }


def by_key(totals: list[UsageTotal]) -> dict[tuple[datetime, str], Decimal]:
    return {(t.hour, t.metric): t.quantity for t in totals}


async def test_totals_per_hour_and_metric_are_the_sums_of_the_documents(es: Es, open_source: Source) -> None:
    # Given documents over two hours and two metrics
    h1, h2 = START, START + timedelta(hours=1)
    es.state.index(
        INDEX,
        doc(h1 + timedelta(minutes=5), "capacity_gb_hours", 1.25),
        doc(h1 + timedelta(minutes=35), "capacity_gb_hours", 2.5),
        doc(h1 + timedelta(minutes=10), "data_transfer_gb", 3),
        doc(h2 + timedelta(minutes=59), "capacity_gb_hours", 4),
    )
    source = await open_source()
    # When the usage of the window is read
    totals = await source.hourly_usage("c1", START, END)
    # Then there is one total per hour and metric, equal to the sum of its documents
    assert by_key(totals) == {
        (h1, "capacity_gb_hours"): Decimal("3.75"),
        (h1, "data_transfer_gb"): Decimal("3"),
        (h2, "capacity_gb_hours"): Decimal("4"),
    }


async def test_decimal_quantities_are_summed_exactly(es: Es, open_source: Source) -> None:
    # Given 0.1 + 0.2 in one hour, and 0.7 + 0.1 + 0.2 of another metric.
    # Elasticsearch sums doubles (the double does too): the sums come back as 0.30000000000000004 and
    # 0.9999999999999999, which Decimal(float) would turn into 0.3000000000000000444089209850062616...
    # and a hair under one unit.
    es.state.index(
        INDEX,
        doc(START, "data_transfer_gb", 0.1),
        doc(START + timedelta(minutes=1), "data_transfer_gb", 0.2),
        doc(START, "capacity_gb_hours", 0.7),
        doc(START + timedelta(minutes=1), "capacity_gb_hours", 0.1),
        doc(START + timedelta(minutes=2), "capacity_gb_hours", 0.2),
    )
    source = await open_source()
    # When the usage is read
    totals = await source.hourly_usage("c1", START, END)
    # Then the totals are the exact decimal sums
    assert by_key(totals) == {
        (START, "data_transfer_gb"): Decimal("0.3"),
        (START, "capacity_gb_hours"): Decimal(1),
    }
    assert [str(t.quantity) for t in sorted(totals, key=lambda t: t.metric)] == ["1", "0.3"]


@pytest.mark.parametrize("clusters", [1, 50])
async def test_one_search_per_call_whatever_the_number_of_clusters(
    es: Es, open_source: Source, clusters: int
) -> None:
    # Given a customer whose usage comes from many clusters, over two hours and three metrics
    for c in range(clusters):
        for hour in (START, START + timedelta(hours=1)):
            for metric in ("capacity_gb_hours", "data_transfer_gb", "backup_gb"):
                es.state.index(INDEX, doc(hour + timedelta(minutes=c % 60), metric, "0.5", cluster=f"k{c}"))
    source = await open_source()
    # When the usage is read
    totals = await source.hourly_usage("c1", START, END)
    # Then exactly one search was made, and each total covers every cluster
    assert len(es.state.searches) == 1
    assert len(totals) == 6
    assert {t.quantity for t in totals} == {Decimal("0.5") * clusters}


async def test_documents_outside_the_window_are_excluded(es: Es, open_source: Source) -> None:
    # Given documents just before, at, just inside the end of, and at the end of [START, END)
    es.state.index(
        INDEX,
        doc(START - timedelta(milliseconds=1), "capacity_gb_hours", 100),
        doc(START, "capacity_gb_hours", 1),
        doc(END - timedelta(milliseconds=1), "capacity_gb_hours", 2),
        doc(END, "capacity_gb_hours", 1000),
    )
    source = await open_source()
    # When the window's usage is read
    totals = await source.hourly_usage("c1", START, END)
    # Then only the documents in [START, END) count
    assert by_key(totals) == {
        (START, "capacity_gb_hours"): Decimal(1),
        (START + timedelta(hours=1), "capacity_gb_hours"): Decimal(2),
    }


async def test_other_customers_usage_is_excluded(es: Es, open_source: Source) -> None:
    # Given usage of c1 and of two other customers in the same hour and index
    es.state.index(
        INDEX,
        doc(START, "capacity_gb_hours", 1, customer="c1"),
        doc(START, "capacity_gb_hours", 10, customer="c2"),
        doc(START, "capacity_gb_hours", 100, customer="c1-other"),
    )
    source = await open_source()
    # When c1's usage is read
    totals = await source.hourly_usage("c1", START, END)
    # Then only c1's documents count
    assert by_key(totals) == {(START, "capacity_gb_hours"): Decimal(1)}


async def test_usage_spread_over_several_indices_is_summed(es: Es, open_source: Source) -> None:
    # Given one hour's usage in two daily indices that the configured pattern matches, and one it does not
    es.state.index("usage-2026.11.26", doc(START, "capacity_gb_hours", 1))
    es.state.index("usage-2026.11.27", doc(START, "capacity_gb_hours", 2))
    es.state.index("audit-2026.11.26", doc(START, "capacity_gb_hours", 100))
    source = await open_source()
    # When the usage is read
    totals = await source.hourly_usage("c1", START, END)
    # Then both matching indices count, in one search
    assert by_key(totals) == {(START, "capacity_gb_hours"): Decimal(3)}
    assert len(es.state.searches) == 1


async def test_a_customer_without_usage_has_no_totals(es: Es, open_source: Source) -> None:
    # Given no index matching the pattern at all
    source = await open_source()
    # When the usage is read
    totals = await source.hourly_usage("c1", START, END)
    # Then there are no totals (and no error)
    assert totals == []


async def test_the_api_key_is_sent(es: Es, open_source: Source) -> None:
    # Given the source configured with an API key
    source = await open_source()
    # When the usage is read
    await source.hourly_usage("c1", START, END)
    # Then the search carried it in the documented header
    assert es.state.searches[0].headers["Authorization"] == f"ApiKey {API_KEY}"


async def test_a_rejected_api_key_is_a_configuration_error(es: Es, open_source: Source) -> None:
    # Given a key Elasticsearch does not know
    source = await open_source(BILLING_ES_API_KEY=api_key("usage-reader", "revoked"))
    # When the usage is read, Then it fails as a configuration problem (401), without retrying
    with pytest.raises(ConfigurationError, match="401"):
        await source.hourly_usage("c1", START, END)
    assert len(es.state.searches) == 1


async def test_the_client_retries_a_single_throttle_by_itself(es: Es, open_source: Source) -> None:
    # Given usage, and Elasticsearch rejecting the next search once with 429
    es.state.index(INDEX, doc(START, "capacity_gb_hours", 1))
    es.state.fail_next(429)
    source = await open_source()
    # When the usage is read
    totals = await source.hourly_usage("c1", START, END)
    # Then the client's own retry got the answer
    assert by_key(totals) == {(START, "capacity_gb_hours"): Decimal(1)}
    assert [r.status for r in es.state.searches] == [429, 200]


@pytest.mark.parametrize("status", [429, 503, 504])
async def test_overload_that_outlasts_the_client_retries_is_transient(
    es: Es, open_source: Source, status: int
) -> None:
    # Given Elasticsearch answering every attempt of the client with an overload status
    es.state.fail_next(status, times=CLIENT_ATTEMPTS)
    source = await open_source()
    # When the usage is read, Then the error is transient (SQS will redeliver the customer-hour)
    with pytest.raises(TransientError, match=str(status)):
        await source.hourly_usage("c1", START, END)
    assert len(es.state.searches) == CLIENT_ATTEMPTS


async def test_a_bad_request_is_a_configuration_error(es: Es, open_source: Source) -> None:
    # Given Elasticsearch refusing the search as malformed (e.g. the metric field is not a keyword)
    cause = {"type": "illegal_argument_exception", "reason": "Fielddata is disabled on [metric]"}
    es.state.fail_next(
        400,
        body={
            "error": {
                "root_cause": [cause],
                "type": "search_phase_execution_exception",
                "reason": "all shards failed",
                "caused_by": cause,
            },
            "status": 400,
        },
    )
    source = await open_source()
    # When the usage is read, Then it is a configuration error, and the client did not retry it
    with pytest.raises(ConfigurationError, match="400"):
        await source.hourly_usage("c1", START, END)
    assert len(es.state.searches) == 1


async def test_a_refused_connection_is_transient(open_source: Source) -> None:
    # Given a URL where nothing listens (a port just freed)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = await open_source(BILLING_ES_URL=f"http://127.0.0.1:{port}")
    # When the usage is read, Then the error is transient
    with pytest.raises(TransientError, match="unreachable"):
        await source.hourly_usage("c1", START, END)


async def test_a_search_that_times_out_is_transient(es: Es, open_source: Source) -> None:
    # Given Elasticsearch holding the search far longer than the configured timeout
    es.state.delay_next(30)
    source = await open_source(BILLING_ES_TIMEOUT_SECONDS="0.2")
    # When the usage is read, Then the error is transient
    with pytest.raises(TransientError, match="ConnectionTimeout"):
        await source.hourly_usage("c1", START, END)


async def test_a_failed_shard_raises_instead_of_returning_partial_usage(es: Es, open_source: Source) -> None:
    # Given usage in two indices, and the shard of one of them failing
    es.state.index("usage-2026.11.26", doc(START, "capacity_gb_hours", 1))
    es.state.index("usage-2026.11.27", doc(START, "capacity_gb_hours", 2))
    es.state.failing_indices.add("usage-2026.11.27")
    source = await open_source()
    # When the usage is read, Then it fails transiently rather than billing the surviving shard's usage
    with pytest.raises(TransientError):
        await source.hourly_usage("c1", START, END)
    # because the search asked Elasticsearch for no partial results
    assert {r.query.get("allow_partial_search_results") for r in es.state.searches} == {"false"}


async def test_more_metrics_than_the_terms_size_raises_instead_of_dropping_usage(
    es: Es, open_source: Source
) -> None:
    # Given one more metric in an hour than the terms aggregation returns
    es.state.index(INDEX, *(doc(START, f"metric_{i:03d}", 1) for i in range(MAX_METRICS + 1)))
    source = await open_source()
    # When the usage is read, Then it raises rather than billing only the first MAX_METRICS metrics
    with pytest.raises(ConfigurationError, match=f"more than {MAX_METRICS}"):
        await source.hourly_usage("c1", START, END)


async def test_configured_field_names_are_used_in_the_query(es: Es, open_source: Source) -> None:
    # Given documents whose fields are named differently, nested in objects
    def nested(minute: int, tenant: str, amount: int) -> dict[str, Any]:
        at = f"2026-11-26T13:{minute:02d}:00Z"
        return {"event": {"created": at}, "tenant": {"id": tenant}, "usage": {"kind": "gb", "amount": amount}}

    es.state.index(INDEX, nested(10, "c1", 2), nested(20, "c9", 9))
    # and the source configured with those names
    source = await open_source(
        BILLING_ES_FIELD_TIMESTAMP="event.created",
        BILLING_ES_FIELD_CUSTOMER="tenant.id",
        BILLING_ES_FIELD_METRIC="usage.kind",
        BILLING_ES_FIELD_QUANTITY="usage.amount",
    )
    # When the usage is read
    totals = await source.hourly_usage("c1", START, END)
    # Then the totals come from those fields
    assert by_key(totals) == {(START, "gb"): Decimal(2)}
    # and the search named them in the filter and the aggregations
    body = es.state.searches[0].body
    assert body["query"]["bool"]["filter"][0] == {"term": {"tenant.id": "c1"}}
    assert set(body["query"]["bool"]["filter"][1]["range"]) == {"event.created"}
    hours = body["aggs"]["hours"]
    assert hours["date_histogram"]["field"] == "event.created"
    assert hours["aggs"]["metrics"]["terms"]["field"] == "usage.kind"
    assert hours["aggs"]["metrics"]["aggs"]["quantity"] == {"sum": {"field": "usage.amount"}}

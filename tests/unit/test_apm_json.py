"""billing.apm_json: orjson writing what the agent's own encoder writes, for the agent's events.

The events are a real elastic-apm agent's (a transaction with labels and an outcome, a span with its
database and destination context, an error with its stack trace), taken after the agent's processors,
as its transports serialize them.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import json
import math
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import elasticapm
import pytest
from elasticapm.utils import json_encoder

from billing.apm_json import dumps
from billing.tracing import LeanClient
from billing_local.apm_capture import CaptureTransport


class Keeping(CaptureTransport):
    """The capture transport, also keeping each processed event as the serializer receives it."""

    kept: ClassVar[list[dict[str, Any]]] = []

    def _process_event(self, event_type: str, data: Any) -> Any:
        processed = super()._process_event(event_type, data)
        if processed is not None:
            Keeping.kept.append({event_type: processed})
        return processed


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    previous = elasticapm.get_client()
    Keeping.kept = []
    # the agent's environment variables win over a Client's arguments (tests/conftest.py sets the capture)
    monkeypatch.setenv("ELASTIC_APM_TRANSPORT_CLASS", f"{__name__}.Keeping")
    client = LeanClient(
        service_name="apm-json-test",
        metrics_interval="0ms",
        central_config=False,
        cloud_provider="none",
        span_compression_enabled=False,
    )
    try:
        client.begin_transaction("messaging")
        elasticapm.label(customer_id="c-1", records_rejected=2, billing_hour="2026-11-30T14:00:00+00:00")
        with elasticapm.capture_span(
            "SELECT FROM ledger",
            span_type="db",
            span_subtype="postgresql",
            span_action="query",
            extra={"db": {"type": "sql", "statement": "SELECT 1 FROM ledger WHERE id = $1"}},
            leaf=True,
        ):
            pass
        try:
            raise RuntimeError("the marketplace refused the call: é")
        except RuntimeError:
            client.capture_exception(handled=True)
        client.end_transaction("RECEIVE billing", "failure")
        yield [*Keeping.kept, {"metadata": client.build_metadata()}]
    finally:
        client.close()
        if previous is not None:
            elasticapm.base.set_client(previous)


def test_the_agents_events_read_back_the_same_as_the_agents_encoder_writes_them(
    events: list[dict[str, Any]],
) -> None:
    # Given every kind of event the agent sends (and the request's metadata)
    assert {next(iter(e)) for e in events} == {"transaction", "span", "error", "metadata"}
    for event in events:
        # When each is written by billing.apm_json and by the agent's encoder
        ours, theirs = dumps(event), json_encoder.dumps(event)
        # Then both read back as the same document (the error's stack trace, non-ASCII text included)
        assert json.loads(ours) == json.loads(theirs)


class Colour(enum.StrEnum):
    RED = "red"


Pair = collections.namedtuple("Pair", "left right")


@pytest.mark.parametrize(
    "value",
    [
        {"set": {1}, "frozen": frozenset({2})},
        {"naive": datetime.datetime(2026, 11, 30, 14, 5, 6, 7)},
        {"bytes": b"ok \xff"},
        {"decimal": decimal.Decimal("2.5")},
        {"str enum": Colour.RED, "pair": Pair(1, "b")},
        {7: "an integer key", None: "no key"},
        {"unknown": type("Thing", (), {"__str__": lambda _self: "a thing"})()},
        {"past 64 bits": 2**70},
    ],
    ids=["sets", "datetime", "bytes", "decimal", "subclasses", "keys", "unknown", "bigint"],
)
def test_types_json_lacks_are_written_as_the_agents_encoder_writes_them(value: dict[Any, Any]) -> None:
    assert json.loads(dumps(value)) == json.loads(json_encoder.dumps(value))


def test_a_uuid_is_written_in_its_canonical_form_and_nan_as_null() -> None:
    # the two documented differences, both valid JSON (the agent writes NaN, which JSON has not)
    assert json.loads(dumps({"id": uuid.UUID(int=1)})) == {"id": "00000000-0000-0000-0000-000000000001"}
    assert json.loads(dumps({"ratio": math.nan, "limit": math.inf})) == {"ratio": None, "limit": None}

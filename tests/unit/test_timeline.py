"""The run timeline: Elastic APM intake v2 NDJSON in, one self-contained HTML page out."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from billing_local.timeline import (
    TimelineInputError,
    load_events,
    render_timeline,
    summarize,
    write_timeline,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
RUN_SMALL = FIXTURES / "apm" / "run-small.ndjson"
SCHEMAS = FIXTURES / "apm-intake-v2"
RUN_START_US = 1_795_701_600_000_000  # 2026-11-26T14:00:00Z


# --- a tiny DOM, enough to check nesting and attributes ----------------------------------------


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    parent: Node | None
    children: list[Node] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def text_content(self) -> str:
        return "".join(self.text) + "".join(child.text_content() for child in self.children)

    def walk(self) -> list[Node]:
        found: list[Node] = []
        for child in self.children:
            found.append(child)
            found.extend(child.walk())
        return found

    def find_all(self, attr: str, value: str | None = None) -> list[Node]:
        return [n for n in self.walk() if attr in n.attrs and (value is None or n.attrs[attr] == value)]

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def ancestor_with(self, attr: str) -> Node | None:
        node = self.parent
        while node is not None and attr not in node.attrs:
            node = node.parent
        return node

    def style(self, prop: str) -> float:
        declarations = dict(part.split(":", 1) for part in self.attrs["style"].split(";") if part)
        return float(declarations[prop].rstrip("%px"))


class _TreeBuilder(HTMLParser):
    VOID = frozenset({"meta", "input", "br", "img", "link", "hr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None)
        self.current = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {name: value or "" for name, value in attrs}, self.current)
        self.current.children.append(node)
        if tag not in self.VOID:
            self.current = node

    def handle_data(self, data: str) -> None:
        self.current.text.append(data)

    def handle_endtag(self, tag: str) -> None:
        node: Node | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent


def parse(page: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(page)
    builder.close()
    return builder.root


def rows(dom: Node) -> list[Node]:
    return dom.find_all("data-transaction-id")


def row_of(dom: Node, transaction_id: str) -> Node:
    (row,) = dom.find_all("data-transaction-id", transaction_id)
    return row


def child_with_class(node: Node, css: str) -> Node:
    (found,) = [n for n in node.walk() if css in n.classes()]
    return found


# --- events ------------------------------------------------------------------------------------


def fixture_events() -> list[dict[str, Any]]:
    return [json.loads(line) for line in RUN_SMALL.read_text(encoding="utf-8").splitlines() if line.strip()]


def inner(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [event[kind] for event in events if kind in event]


def metadata(service: str = "billing-biller") -> dict[str, Any]:
    return {"metadata": {"service": {"name": service, "agent": {"name": "python", "version": "6.23.0"}}}}


def transaction(
    tx_id: str,
    start_ms: float,
    duration_ms: float,
    *,
    outcome: str | None = "success",
    labels: dict[str, Any] | None = None,
    age_ms: int | None = None,
) -> dict[str, Any]:
    context: dict[str, Any] = {"tags": labels or {}}
    if age_ms is not None:
        context["message"] = {"queue": {"name": "billing-queue"}, "age": {"ms": age_ms}}
    body: dict[str, Any] = {
        "id": tx_id,
        "trace_id": "0" * 32,
        "name": "RECEIVE billing-queue",
        "type": "messaging",
        "timestamp": RUN_START_US + round(start_ms * 1000),
        "duration": duration_ms,
        "result": "success",
        "span_count": {"started": 0},
        "context": context,
    }
    if outcome is not None:
        body["outcome"] = outcome
    return {"transaction": body}


def span(span_id: str, parent_id: str, duration_ms: float, **placement: float) -> dict[str, Any]:
    """A span placed by ``timestamp_ms`` (since RUN_START) or ``start`` (ms after its transaction)."""
    body: dict[str, Any] = {
        "id": span_id,
        "trace_id": "0" * 32,
        "parent_id": parent_id,
        "name": f"span {span_id}",
        "type": "db",
        "subtype": "postgresql",
        "duration": duration_ms,
    }
    if "timestamp_ms" in placement:
        body["timestamp"] = RUN_START_US + round(placement["timestamp_ms"] * 1000)
    if "start" in placement:
        body["start"] = placement["start"]
    return {"span": body}


def owning_transaction(span_id: str, spans: dict[str, dict[str, Any]], transaction_ids: set[str]) -> str:
    parent = spans[span_id]["parent_id"]
    while parent not in transaction_ids:
        parent = spans[parent]["parent_id"]
    return str(parent)


# --- the fixture is what the agent really sends ------------------------------------------------


def _fixture_lines() -> list[tuple[int, str, dict[str, Any]]]:
    lines = []
    for number, line in enumerate(RUN_SMALL.read_text(encoding="utf-8").splitlines(), start=1):
        ((kind, body),) = json.loads(line).items()
        lines.append((number, kind, body))
    return lines


@pytest.mark.parametrize(("number", "kind", "body"), _fixture_lines(), ids=lambda v: str(v)[:12])
def test_fixture_line_is_valid_against_its_intake_v2_schema(
    number: int, kind: str, body: dict[str, Any]
) -> None:
    # Given the upstream schema for this line's event kind (the schemas describe the inner object)
    schema = json.loads((SCHEMAS / f"{kind}.json").read_text(encoding="utf-8"))
    # Draft 7, not the draft 4 the agent's own tests use: error.json and metricset.json state rules with
    # `if`/`then` (an error's transaction_id needs trace_id and parent_id; a histogram's counts need values),
    # keywords draft 4 does not know and would silently skip. Draft 7 enforces them.
    validator = jsonschema.Draft7Validator(schema)

    # When the line is validated
    problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)]

    # Then it conforms
    assert problems == [], f"line {number} ({kind})"


def test_every_billing_transaction_links_to_the_dispatchers_send_span() -> None:
    # Given the fixture's transactions and spans
    events = fixture_events()
    send_spans = {s["id"] for s in inner(events, "span") if s.get("action") == "send_batch"}
    receives = [t for t in inner(events, "transaction") if t["name"] == "RECEIVE billing-queue"]

    # When the span links of each SQS-triggered transaction are read
    linked = {link["span_id"] for t in receives for link in t["links"]}

    # Then they all point at the dispatcher's send span
    assert len(receives) == 6
    assert linked == send_spans


def test_failed_billing_transaction_has_a_matching_error_event() -> None:
    # Given the fixture
    events = fixture_events()

    # When failed transactions and errors are paired
    failed = {t["id"] for t in inner(events, "transaction") if t["outcome"] == "failure"}
    errored = {e["transaction_id"] for e in inner(events, "error")}

    # Then each failure has its error and no error is unpaired
    assert len(failed) == 1
    assert errored == failed


# --- the page ----------------------------------------------------------------------------------


def test_page_has_one_row_per_transaction_with_id_outcome_and_customer() -> None:
    # Given the fixture's transactions
    events = fixture_events()
    expected = {
        (t["id"], t["outcome"], t["context"]["tags"].get("customer_id", ""))
        for t in inner(events, "transaction")
    }

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then each transaction has exactly one row carrying its id, outcome and customer
    found = [
        (r.attrs["data-transaction-id"], r.attrs["data-outcome"], r.attrs["data-customer"]) for r in rows(dom)
    ]
    assert sorted(found) == sorted(expected)


def test_rows_are_ordered_by_transaction_start() -> None:
    # Given transactions listed out of start order
    events = [
        metadata(),
        transaction("late", 500, 10),
        transaction("early", 0, 10),
        transaction("mid", 200, 10),
    ]

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then the rows follow their start times
    assert [r.attrs["data-transaction-id"] for r in rows(dom)] == ["early", "mid", "late"]


def test_spans_are_nested_inside_their_transactions_row() -> None:
    # Given the fixture, whose domain spans have SQL children (owner known only through the parent chain)
    events = fixture_events()
    spans = {s["id"]: s for s in inner(events, "span")}
    transaction_ids = {t["id"] for t in inner(events, "transaction")}

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then every span element sits inside the row of the transaction its parent chain leads to
    drawn = {n.attrs["data-span-id"]: n for n in dom.find_all("data-span-id")}
    assert drawn.keys() == spans.keys()
    for span_id, node in drawn.items():
        row = node.ancestor_with("data-transaction-id")
        assert row is not None
        assert row.attrs["data-transaction-id"] == owning_transaction(span_id, spans, transaction_ids)


def test_child_span_is_drawn_on_a_lower_lane_than_its_parent() -> None:
    # Given a span with a child span
    events = [
        metadata(),
        transaction("tx", 0, 100),
        span("child", "parent", 5, timestamp_ms=12),
        span("parent", "tx", 20, timestamp_ms=10),
    ]

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then the child is drawn below its parent (the parent keeps the stylesheet's top)
    (child,) = dom.find_all("data-span-id", "child")
    (parent,) = dom.find_all("data-span-id", "parent")
    assert "top" not in parent.attrs["style"]
    assert child.style("top") > 3


def test_span_is_placed_relative_to_its_transaction() -> None:
    # Given a 200 ms transaction with a span 50 ms in and 100 ms long
    events = [metadata(), transaction("tx", 0, 200), span("s", "tx", 100, timestamp_ms=50)]

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then the span covers the middle half of its transaction's bar
    (node,) = dom.find_all("data-span-id", "s")
    assert node.style("left") == pytest.approx(25)
    assert node.style("width") == pytest.approx(50)


def test_span_without_timestamp_is_placed_by_its_start_offset() -> None:
    # Given a span that gives only `start`, its offset from the transaction start
    events = [metadata(), transaction("tx", 0, 200), span("s", "tx", 20, start=150)]

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then it is drawn 150 ms into its 200 ms transaction
    (node,) = dom.find_all("data-span-id", "s")
    assert node.style("left") == pytest.approx(75)


def test_queue_wait_width_is_proportional_to_message_age() -> None:
    # Given two equally long transactions whose messages waited 100 ms and 300 ms
    events = [
        metadata(),
        transaction("short-wait", 1000, 200, age_ms=100),
        transaction("long-wait", 1000, 200, age_ms=300),
    ]

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then the queue-wait bars scale with the age, on the same scale as the transaction bars
    short_row, long_row = row_of(dom, "short-wait"), row_of(dom, "long-wait")
    short_wait = child_with_class(short_row, "q").style("width")
    long_wait = child_with_class(long_row, "q").style("width")
    bar = child_with_class(short_row, "t").style("width")
    assert long_wait / short_wait == pytest.approx(3, rel=1e-3)
    assert short_wait / bar == pytest.approx(0.5, rel=1e-3)


def test_queue_wait_bar_ends_where_its_transaction_begins() -> None:
    # Given the fixture, where every billing transaction reports its message age
    events = fixture_events()
    waited = [t["id"] for t in inner(events, "transaction") if "message" in t["context"]]

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then each queue-wait bar is a separate element ending at the left edge of the transaction bar
    assert len(waited) == 6
    for tx_id in waited:
        row = row_of(dom, tx_id)
        wait, bar = child_with_class(row, "q"), child_with_class(row, "t")
        assert wait.parent is bar.parent
        assert wait.style("left") + wait.style("width") == pytest.approx(bar.style("left"), abs=0.002)


def test_failed_transaction_is_coloured_as_failure() -> None:
    # Given the fixture with its one failed transaction
    events = fixture_events()
    (failed,) = [t["id"] for t in inner(events, "transaction") if t["outcome"] == "failure"]

    # When the timeline is rendered
    page = render_timeline(events)
    dom = parse(page)

    # Then its bar takes the failure colour, the others the success colour
    colours = {r.attrs["data-transaction-id"]: child_with_class(r, "t").classes() - {"t"} for r in rows(dom)}
    assert colours.pop(failed) == {"fail"}
    assert all(colour == {"ok"} for colour in colours.values())
    assert re.search(r"\.fail\{background:#ffcdd2", page)


def test_transaction_without_outcome_is_coloured_unknown() -> None:
    # Given a transaction that reports no outcome
    events = [metadata(), transaction("tx", 0, 10, outcome=None)]

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then its row says unknown and its bar is grey
    row = row_of(dom, "tx")
    assert row.attrs["data-outcome"] == "unknown"
    assert "unk" in child_with_class(row, "t").classes()


def test_transaction_tooltip_shows_name_duration_result_outcome_and_labels() -> None:
    # Given the fixture's failed transaction
    events = fixture_events()
    (failed,) = [t for t in inner(events, "transaction") if t["outcome"] == "failure"]

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then hovering its bar tells what it was
    tip = child_with_class(row_of(dom, failed["id"]), "t").attrs["title"]
    assert tip.splitlines()[0] == "RECEIVE billing-queue (billing-biller)"
    assert "duration 1.77 s · result failure · outcome failure" in tip
    for key, value in failed["context"]["tags"].items():
        assert f"{key}={value}" in tip.splitlines()


def test_span_tooltip_shows_name_type_and_duration() -> None:
    # Given an Elasticsearch search span
    events = [metadata(), transaction("tx", 0, 100), span("s", "tx", 38.4, timestamp_ms=5)]
    events[-1]["span"].update(name="ES POST /usage-2026.11/_search", subtype="elasticsearch")

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then its tooltip names it, its type and how long it took
    (node,) = dom.find_all("data-span-id", "s")
    assert node.attrs["title"].splitlines() == [
        "ES POST /usage-2026.11/_search",
        "db/elasticsearch · 38.4 ms",
    ]


def test_each_transaction_names_the_service_of_its_request_body() -> None:
    # Given the fixture: one request body (metadata line) per Lambda invocation, two services
    events = fixture_events()
    dispatcher = next(t["id"] for t in inner(events, "transaction") if t["type"] == "request")

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then each tooltip names the service from the metadata line before it
    services = {
        r.attrs["data-transaction-id"]: child_with_class(r, "t").attrs["title"].splitlines()[0]
        for r in rows(dom)
    }
    assert services.pop(dispatcher) == "billing-dispatcher (billing-dispatcher)"
    assert set(services.values()) == {"RECEIVE billing-queue (billing-biller)"}


def test_error_is_marked_on_its_transaction() -> None:
    # Given the fixture's error event
    events = fixture_events()
    (error,) = inner(events, "error")

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then a marker for it sits in its transaction's row
    (marker,) = dom.find_all("data-error-id", error["id"])
    row = marker.ancestor_with("data-transaction-id")
    assert row is not None
    assert row.attrs["data-transaction-id"] == error["transaction_id"]
    assert (
        marker.attrs["title"]
        == "MarketplaceUnavailable: servicecontrol.googleapis.com answered 503 after 3 attempts"
    )


def test_strings_from_events_are_escaped() -> None:
    # Given labels, a name and a customer id carrying markup
    hostile = '"><script>alert(1)</script>'
    events = [metadata(), transaction("tx", 0, 10, labels={"customer_id": hostile, "note": "<b>&amp;"})]
    events[-1]["transaction"]["name"] = "<img src=x onerror=alert(2)>"

    # When the timeline is rendered
    page = render_timeline(events, title="<script>title</script>")

    # Then none of it becomes markup: only the page's own script tag exists, values survive as text
    assert page.count("<script>") == 1
    assert "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    row = row_of(parse(page), "tx")
    assert row.attrs["data-customer"] == hostile
    assert "note=<b>&amp;" in child_with_class(row, "t").attrs["title"]


def test_page_references_no_external_resources() -> None:
    # Given the fixture, whose spans call https endpoints
    events = fixture_events()

    # When the timeline is rendered
    page = render_timeline(events)
    dom = parse(page)

    # Then nothing in the page can make the browser fetch anything
    assert "http://" not in page
    assert "https://" not in page
    assert not [n for n in dom.walk() if {"src", "href"} & n.attrs.keys()]
    assert "url(" not in page
    assert "@import" not in page


def test_header_shows_counts_makespan_and_percentiles() -> None:
    # Given the fixture: 7 transactions, 45 spans, 1 failure; the run lasts 2.23 s
    events = fixture_events()

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then the header cards show those figures
    shown = {n.attrs["data-stat"]: n.children[0].text_content() for n in dom.find_all("data-stat")}
    assert shown == {
        "transactions": "7",
        "spans": "45",
        "failures": "1",
        "rejected": "0",
        "errors": "1",
        "makespan": "2.23 s",
        "p50": "640 ms",
        "p99": "1.77 s",
    }


def test_percentiles_are_nearest_rank_over_transaction_durations() -> None:
    # Given 100 transactions lasting 1, 2, ... 100 ms
    events = [metadata(), *(transaction(f"tx{n}", n * 10, n) for n in range(1, 101))]

    # When the run is summarized
    stats = summarize(events)

    # Then p50 and p99 are observed durations picked by nearest rank
    assert (stats.p50_ms, stats.p99_ms) == (50, 99)


# --- reading and writing files -----------------------------------------------------------------


def test_bad_json_error_names_the_line(tmp_path: Path) -> None:
    # Given an events file whose third line is cut short
    path = tmp_path / "events.ndjson"
    path.write_text('{"metadata": {}}\n\n{"transaction": {"id": \n', encoding="utf-8")

    # When it is loaded
    with pytest.raises(TimelineInputError) as raised:
        load_events(path)

    # Then the error points at that file and line
    assert str(raised.value).startswith(f"{path}:3: invalid JSON")


def test_line_that_is_not_an_object_is_rejected_with_its_line(tmp_path: Path) -> None:
    # Given an events file whose second line is a JSON array
    path = tmp_path / "events.ndjson"
    path.write_text('{"metadata": {}}\n[1, 2]\n', encoding="utf-8")

    # When it is loaded
    with pytest.raises(TimelineInputError) as raised:
        load_events(path)

    # Then the error names the line and what was wrong
    assert str(raised.value) == f"{path}:2: expected a JSON object, got list"


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    # Given two events separated by blank and whitespace-only lines
    path = tmp_path / "events.ndjson"
    path.write_text('\n{"metadata": {}}\n   \n\n{"span": {}}\n\n', encoding="utf-8")

    # When it is loaded
    events = load_events(path)

    # Then only the events come back, in order
    assert events == [{"metadata": {}}, {"span": {}}]


def test_write_timeline_writes_the_page_and_returns_its_figures(tmp_path: Path) -> None:
    # Given the fixture file
    html_path = tmp_path / "run.html"

    # When it is written as a timeline
    stats = write_timeline(RUN_SMALL, html_path)

    # Then the page holds every transaction and the figures match the fixture
    assert len(rows(parse(html_path.read_text(encoding="utf-8")))) == 7
    assert (stats.transactions, stats.spans, stats.errors, stats.failures) == (7, 45, 1, 1)
    assert stats.makespan_ms == pytest.approx(2233.962)


def test_a_customer_whose_records_were_rejected_is_marked_and_counted() -> None:
    # Given the fixture, with one successful bill whose records AWS rejected (billing.tracing labels it)
    events = fixture_events()
    billed = [
        t
        for t in inner(events, "transaction")
        if t.get("outcome") == "success" and t["context"]["tags"].get("customer_id")
    ]
    billed[0]["result"] = "rejected"
    billed[0]["context"]["tags"]["records_rejected"] = 2

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then its row is marked (and kept by "failures only"), the others are not, and the header counts it
    marked = [r.attrs["data-transaction-id"] for r in rows(dom) if r.attrs.get("data-records") == "rejected"]
    assert marked == [billed[0]["id"]]
    (card,) = dom.find_all("data-stat", "rejected")
    assert card.children[0].text_content() == "1" and "bad" in card.classes()


def sweep_peak(transactions: list[dict[str, Any]]) -> int:
    """The most transactions in flight at once, counted independently of the page."""
    edges = sorted(
        [(t["timestamp"], 1) for t in transactions]
        + [(t["timestamp"] + t["duration"] * 1000, -1) for t in transactions]
    )
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


def test_header_has_a_concurrency_strip_whose_peak_is_the_runs_most_in_flight() -> None:
    # Given the fixture's transactions
    events = fixture_events()
    transactions = inner(events, "transaction")

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then the strip's tallest slice is the most transactions that overlapped, and none holds more
    (strip,) = dom.find_all("id", "concurrency")
    in_flight = [int(n.attrs["data-in-flight"]) for n in strip.find_all("data-in-flight")]
    assert max(in_flight) == sweep_peak(transactions) == int(strip.attrs["data-peak"])
    # the first slice holds the first start, the last the last end
    assert len(in_flight) == 120 and in_flight[0] >= 1 and in_flight[-1] >= 1


def test_header_has_a_duration_histogram_counting_every_transaction_once() -> None:
    # Given the fixture's transactions
    events = fixture_events()
    durations = [t["duration"] for t in inner(events, "transaction")]

    # When the timeline is rendered
    dom = parse(render_timeline(events))

    # Then the histogram's bins cover 0 to the longest duration and count each transaction in its bin
    (histogram,) = dom.find_all("id", "durations")
    bins = [
        (float(n.attrs["data-from-ms"]), float(n.attrs["data-to-ms"]), int(n.attrs["data-count"]))
        for n in histogram.find_all("data-count")
    ]
    assert sum(n for _, _, n in bins) == len(durations)
    assert bins[0][0] == 0 and bins[-1][1] == pytest.approx(max(durations), abs=1e-3)
    for low, high, n in bins[:-1]:
        assert n == sum(1 for d in durations if low <= d < high)

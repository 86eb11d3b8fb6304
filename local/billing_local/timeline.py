"""Draw a billing run as a self-contained HTML timeline from Elastic APM intake v2 NDJSON.

Dev tooling behind ``billing timeline``: it reads what the agent posts to the APM Server (or what the
local runner writes), one transaction per row, spans nested inside, the SQS queue wait before it.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable, Mapping

__all__ = [
    "DEFAULT_TITLE",
    "TimelineInputError",
    "TimelineStats",
    "load_events",
    "render_timeline",
    "summarize",
    "write_timeline",
]

DEFAULT_TITLE = "Billing run timeline"

_OUTCOME_CLASS = {"success": "ok", "failure": "fail"}
# Span colour by kind; the key is (type, subtype) first, then type alone.
_KIND_CLASS = {
    ("db", "elasticsearch"): "es",
    ("db", None): "db",
    ("external", None): "ext",
    ("messaging", None): "msg",
    ("app", None): "app",
}
_LANE_PX = 7  # vertical step between span nesting depths inside a transaction bar
_TARGET_TICKS = 10
_BAR_PX = 18  # transaction bar height with one level of spans; deeper nesting grows the row


class TimelineInputError(ValueError):
    """A line of the events file is not a JSON object."""


@dataclass(frozen=True)
class TimelineStats:
    """Counts and durations shown in the page header."""

    transactions: int
    spans: int
    errors: int
    failures: int
    makespan_ms: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True, slots=True)
class _Span:
    id: str
    name: str
    kind: str
    css: str
    start_us: float
    duration_ms: float
    depth: int
    failed: bool


@dataclass(frozen=True, slots=True)
class _Error:
    id: str
    timestamp_us: float | None
    text: str


@dataclass(slots=True)
class _Transaction:
    id: str
    name: str
    type: str
    service: str
    start_us: float | None
    duration_ms: float
    result: str
    outcome: str
    labels: tuple[tuple[str, str], ...]
    queue: str
    queue_age_ms: float | None
    spans: list[_Span] = field(default_factory=list)
    errors: list[_Error] = field(default_factory=list)
    depth: int = 0

    def label(self, key: str) -> str:
        return next((value for name, value in self.labels if name == key), "")


@dataclass(frozen=True, slots=True)
class _RawSpan:
    id: str
    parent_id: str
    transaction_id: str
    name: str
    type: str
    subtype: str | None
    timestamp_us: float | None
    start_ms: float | None
    duration_ms: float
    failed: bool


@dataclass(slots=True)
class _Run:
    transactions: list[_Transaction]
    span_count: int
    error_count: int
    orphan_spans: int


def load_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read intake v2 NDJSON, one event object per non-blank line."""
    events: list[dict[str, Any]] = []
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as exc:
                reason = f"invalid JSON: {exc.msg} (column {exc.colno})"
                raise TimelineInputError(f"{path}:{number}: {reason}") from exc
            if not isinstance(event, dict):
                reason = f"expected a JSON object, got {type(event).__name__}"
                raise TimelineInputError(f"{path}:{number}: {reason}")
            events.append(event)
    return events


def render_timeline(events: Iterable[Mapping[str, Any]], title: str = DEFAULT_TITLE) -> str:
    """Render intake v2 events as one self-contained HTML page (no external resources)."""
    run = _collect(events)
    return _render(run, _stats(run), title)


def summarize(events: Iterable[Mapping[str, Any]]) -> TimelineStats:
    """The header figures of ``render_timeline`` for the same events."""
    return _stats(_collect(events))


def write_timeline(
    ndjson_path: str | os.PathLike[str],
    html_path: str | os.PathLike[str],
    title: str | None = None,
) -> TimelineStats:
    """Render the NDJSON file at ``ndjson_path`` to ``html_path``; return the header figures."""
    run = _collect(load_events(ndjson_path))
    stats = _stats(run)
    if not stats.transactions:
        # an empty page with "0 transactions" looks like a run that did nothing, not a wrong file
        raise TimelineInputError(
            f"{ndjson_path}: no transaction events (an APM intake NDJSON, e.g. from --apm-events, has one "
            "line per transaction)"
        )
    page = _render(run, stats, title or f"{DEFAULT_TITLE}: {Path(ndjson_path).name}")
    Path(html_path).write_text(page, encoding="utf-8")
    return stats


# --- reading events -----------------------------------------------------------------------------


def _obj(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _collect(events: Iterable[Mapping[str, Any]]) -> _Run:
    # Spans and errors arrive before their transaction (the agent sends each event when it ends),
    # so everything is gathered first and joined afterwards.
    service = ""
    transactions: dict[str, _Transaction] = {}
    raw_spans: dict[str, _RawSpan] = {}
    span_count = 0
    errors: list[tuple[str, _Error]] = []
    for event in events:
        if "metadata" in event:
            service = _text(_obj(_obj(event["metadata"]).get("service")).get("name"))
        elif "transaction" in event:
            tx = _read_transaction(_obj(event["transaction"]), service)
            transactions[tx.id] = tx
        elif "span" in event:
            span_count += 1
            raw = _read_span(_obj(event["span"]))
            raw_spans[raw.id] = raw
        elif "error" in event:
            raw_error = _obj(event["error"])
            errors.append((_text(raw_error.get("transaction_id")), _read_error(raw_error)))

    orphans = 0
    for raw in raw_spans.values():
        owner_id, depth = _owner(raw, raw_spans, transactions)
        owner = transactions.get(owner_id) if owner_id else None
        if owner is None or owner.start_us is None:
            orphans += 1
            continue
        # Agents send either an absolute `timestamp` or `start`, an offset from the transaction's start.
        start_us = raw.timestamp_us
        if start_us is None:
            start_us = owner.start_us + (raw.start_ms or 0.0) * 1000
        kind = raw.type + (f"/{raw.subtype}" if raw.subtype else "")
        css = _KIND_CLASS.get((raw.type, raw.subtype)) or _KIND_CLASS.get((raw.type, None), "oth")
        owner.spans.append(_Span(raw.id, raw.name, kind, css, start_us, raw.duration_ms, depth, raw.failed))
        owner.depth = max(owner.depth, depth)
    for transaction_id, error in errors:
        if transaction_id in transactions:
            transactions[transaction_id].errors.append(error)

    ordered = sorted(transactions.values(), key=lambda tx: (tx.start_us is None, tx.start_us or 0.0, tx.id))
    for tx in ordered:
        tx.spans.sort(key=lambda span: (span.depth, span.start_us))
    return _Run(ordered, span_count, len(errors), orphans)


def _read_transaction(tx: Mapping[str, Any], service: str) -> _Transaction:
    context = _obj(tx.get("context"))
    message = _obj(context.get("message"))
    tags = _obj(context.get("tags"))
    return _Transaction(
        id=_text(tx.get("id")),
        name=_text(tx.get("name")) or "(unnamed)",
        type=_text(tx.get("type")),
        service=service,
        start_us=_number(tx.get("timestamp")),
        duration_ms=_number(tx.get("duration")) or 0.0,
        result=_text(tx.get("result")),
        outcome=_text(tx.get("outcome")) or "unknown",
        labels=tuple((str(key), _text(value)) for key, value in tags.items()),
        queue=_text(_obj(message.get("queue")).get("name")),
        queue_age_ms=_number(_obj(message.get("age")).get("ms")),
    )


def _read_span(span: Mapping[str, Any]) -> _RawSpan:
    subtype = span.get("subtype")
    return _RawSpan(
        id=_text(span.get("id")),
        parent_id=_text(span.get("parent_id")),
        transaction_id=_text(span.get("transaction_id")),
        name=_text(span.get("name")),
        type=_text(span.get("type")),
        subtype=subtype if isinstance(subtype, str) and subtype else None,
        timestamp_us=_number(span.get("timestamp")),
        start_ms=_number(span.get("start")),
        duration_ms=_number(span.get("duration")) or 0.0,
        failed=span.get("outcome") == "failure",
    )


def _read_error(error: Mapping[str, Any]) -> _Error:
    exception = _obj(error.get("exception"))
    log = _obj(error.get("log"))
    if exception:
        parts = (_text(exception.get("type")), _text(exception.get("message")))
        text = ": ".join(part for part in parts if part)
    else:
        text = _text(log.get("message"))
    return _Error(_text(error.get("id")), _number(error.get("timestamp")), text or "error")


def _owner(
    span: _RawSpan, spans: Mapping[str, _RawSpan], transactions: Mapping[str, _Transaction]
) -> tuple[str | None, int]:
    """The transaction a span belongs to (by its parent chain) and its nesting depth (1 = direct child)."""
    depth = 1
    current = span
    seen = {span.id}
    while current.parent_id not in transactions:
        parent = spans.get(current.parent_id)
        if parent is None or parent.id in seen:
            # The parent was dropped or never sent: trust the span's own transaction_id.
            return (span.transaction_id or None), depth
        seen.add(parent.id)
        current = parent
        depth += 1
    return current.parent_id, depth


# --- figures ------------------------------------------------------------------------------------


def _percentile(sorted_values: list[float], percent: float) -> float:
    """Nearest-rank percentile: always one of the observed values."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(percent / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _stats(run: _Run) -> TimelineStats:
    durations = sorted(tx.duration_ms for tx in run.transactions)
    placed = [tx for tx in run.transactions if tx.start_us is not None]
    makespan = 0.0
    if placed:
        first = min(tx.start_us or 0.0 for tx in placed)
        last = max((tx.start_us or 0.0) + tx.duration_ms * 1000 for tx in placed)
        makespan = (last - first) / 1000
    return TimelineStats(
        transactions=len(run.transactions),
        spans=run.span_count,
        errors=run.error_count,
        failures=sum(tx.outcome == "failure" for tx in run.transactions),
        makespan_ms=makespan,
        p50_ms=_percentile(durations, 50),
        p99_ms=_percentile(durations, 99),
    )


# --- HTML ---------------------------------------------------------------------------------------


def _esc(value: str) -> str:
    return html.escape(value, quote=True)


def _ms(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.1f} s"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    if value >= 100:
        return f"{value:.0f} ms"
    return f"{value:.1f} ms"


def _pct(value: float, digits: int = 3) -> str:
    # Three decimals of the run's width is well under a pixel; spans are relative to their short parent.
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _tick_step(range_s: float) -> float:
    raw = range_s / _TARGET_TICKS
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1.0, 2.0, 5.0, 10.0) if m * magnitude >= raw)


def _axis(range_ms: float) -> tuple[str, str]:
    """Tick labels and grid lines, in seconds since the start of the axis."""
    range_s = range_ms / 1000
    step = _tick_step(range_s)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    labels: list[str] = []
    lines: list[str] = []
    count = math.floor(range_s / step + 1e-9)
    for index in range(count + 1):
        left = _pct(index * step / range_s * 100)
        labels.append(f'<span style="left:{left}%">{index * step:.{decimals}f} s</span>')
        lines.append(f'<i style="left:{left}%"></i>')
    return "".join(labels), "".join(lines)


def _transaction_tip(tx: _Transaction) -> str:
    lines = [f"{tx.name} ({tx.service})" if tx.service else tx.name]
    lines.append(f"duration {_ms(tx.duration_ms)} · result {tx.result or '-'} · outcome {tx.outcome}")
    if tx.queue_age_ms is not None:
        lines.append(f"queue wait {_ms(tx.queue_age_ms)}" + (f" in {tx.queue}" if tx.queue else ""))
    lines.extend(f"{key}={value}" for key, value in tx.labels)
    lines.extend(f"error: {error.text}" for error in tx.errors)
    return "\n".join(lines)


def _row(tx: _Transaction, origin_us: float, range_ms: float) -> str:
    start_us = tx.start_us or 0.0
    left = (start_us - origin_us) / 1000 / range_ms * 100
    width = tx.duration_ms / range_ms * 100
    duration_us = max(tx.duration_ms * 1000, 1e-3)
    bar_px = max(_BAR_PX, 4 + _LANE_PX * tx.depth)
    row_style = f' style="height:{bar_px + 6}px"' if bar_px > _BAR_PX else ""
    height = f";height:{bar_px}px" if bar_px > _BAR_PX else ""
    customer = tx.label("customer_id")
    primary = customer or tx.name
    secondary = tx.label("marketplace") if customer else tx.type
    bad = _bad_records(tx)
    flag = f' data-records="{bad}"' if bad else ""
    badge = f'<span class="rj">{bad}</span>' if bad else ""
    parts = [
        f'<div class="r" data-transaction-id="{_esc(tx.id)}" data-outcome="{_esc(tx.outcome)}"'
        f' data-customer="{_esc(customer)}"{flag}{row_style}>'
        f'<div class="l"><b>{_esc(primary)}</b> <small>{_esc(secondary)}</small>{badge}'
        f"<em>{_esc(_ms(tx.duration_ms))}</em></div>"
        '<div class="k">'
    ]
    if tx.queue_age_ms is not None and tx.queue_age_ms > 0:
        wait = tx.queue_age_ms / range_ms * 100
        where = f" in {tx.queue}" if tx.queue else ""
        parts.append(
            f'<i class="q" style="left:{_pct(left - wait)}%;width:{_pct(wait)}%{height}"'
            f' title="queue wait {_esc(_ms(tx.queue_age_ms))}{_esc(where)}"></i>'
        )
    outcome_class = _OUTCOME_CLASS.get(tx.outcome, "unk")
    parts.append(
        f'<b class="t {outcome_class}" style="left:{_pct(left)}%;width:{_pct(width)}%{height}"'
        f' title="{_esc(_transaction_tip(tx))}">'
    )
    for span in tx.spans:
        offset = (span.start_us - start_us) / duration_us * 100
        span_width = span.duration_ms * 1000 / duration_us * 100
        top = f";top:{3 + _LANE_PX * (span.depth - 1)}px" if span.depth > 1 else ""
        failed = " x" if span.failed else ""
        tip = f"{span.name}\n{span.kind} · {_ms(span.duration_ms)}" + (" · failure" if span.failed else "")
        parts.append(
            f'<i class="s {span.css}{failed}" data-span-id="{_esc(span.id)}"'
            f' style="left:{_pct(offset, 2)}%;width:{_pct(span_width, 2)}%{top}" title="{_esc(tip)}"></i>'
        )
    for error in tx.errors:
        at = error.timestamp_us if error.timestamp_us is not None else start_us + duration_us
        offset = (at - start_us) / duration_us * 100
        parts.append(
            f'<i class="e" data-error-id="{_esc(error.id)}" style="left:{_pct(offset, 2)}%"'
            f' title="{_esc(error.text)}"></i>'
        )
    parts.append("</b></div></div>")
    return "".join(parts)


def _bad_records(tx: _Transaction) -> str:
    """'rejected' or 'failed' when the bill left such a record (billing.tracing.record_success says so
    in the transaction's result and labels); '' otherwise. A failed invocation is its outcome's."""
    if tx.result == "rejected" or _count(tx.label("records_rejected")):
        return "rejected"
    if _count(tx.label("records_failed")):
        return "failed"
    return ""


def _count(text: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        return 0


STRIP_BUCKETS = 120
HISTOGRAM_BINS = 24


def concurrency_strip(transactions: list[_Transaction], buckets: int = STRIP_BUCKETS) -> list[int]:
    """The most transactions in flight at once within each of ``buckets`` equal slices of the run."""
    placed = [tx for tx in transactions if tx.start_us is not None]
    if not placed:
        return []
    first = min(tx.start_us or 0.0 for tx in placed)
    last = max((tx.start_us or 0.0) + tx.duration_ms * 1000 for tx in placed)
    width = (last - first) / buckets
    # every start (+1) and end (-1) in time order, an end before a start at the same instant
    edges = sorted(
        [((tx.start_us or 0.0), 1) for tx in placed]
        + [((tx.start_us or 0.0) + tx.duration_ms * 1000, -1) for tx in placed]
    )
    level = 0  # in flight as the slice begins
    out: list[int] = []
    cursor = 0
    for index in range(buckets):
        slice_end = first + (index + 1) * width
        peak = level
        while cursor < len(edges) and (edges[cursor][0] < slice_end or index == buckets - 1):
            level += edges[cursor][1]
            peak = max(peak, level)
            cursor += 1
        out.append(peak)
    return out


def duration_histogram(
    transactions: list[_Transaction], bins: int = HISTOGRAM_BINS
) -> list[tuple[float, float, int]]:
    """(from ms, to ms, transactions) over equal bins from 0 to the longest duration."""
    durations = [tx.duration_ms for tx in transactions]
    if not durations:
        return []
    top = max(max(durations), 1e-3)
    width = top / bins
    counts = [0] * bins
    for d in durations:
        counts[min(int(d / width), bins - 1)] += 1
    return [(i * width, (i + 1) * width, n) for i, n in enumerate(counts)]


def _header_charts(transactions: list[_Transaction]) -> str:
    strip = concurrency_strip(transactions)
    histogram = duration_histogram(transactions)
    if not strip:
        return ""
    peak = max(strip) or 1
    strip_bars = "".join(
        f'<i data-in-flight="{n}" style="height:{_pct(n / peak * 100, 1)}%" title="{n} in flight"></i>'
        for n in strip
    )
    most = max(n for _, _, n in histogram) or 1
    bars = "".join(
        f'<i data-from-ms="{lo:.3f}" data-to-ms="{hi:.3f}" data-count="{n}"'
        f' style="height:{_pct(n / most * 100, 1)}%" title="{_esc(_ms(lo))} to {_esc(_ms(hi))}: {n}"></i>'
        for lo, hi, n in histogram
    )
    return (
        f'<div class="charts"><figure id="concurrency" data-peak="{max(strip)}">'
        f'<div class="bars">{strip_bars}</div><figcaption>in flight over the run (peak {max(strip)})'
        f'</figcaption></figure><figure id="durations"><div class="bars">{bars}</div>'
        f"<figcaption>durations, 0 to {_esc(_ms(histogram[-1][1]))}</figcaption></figure></div>"
    )


def _run_labels(transactions: list[_Transaction]) -> str:
    shown: list[str] = []
    for key in ("run_id", "billing_hour"):
        values = {tx.label(key) for tx in transactions} - {""}
        if len(values) == 1:
            shown.append(f"{key} <code>{_esc(values.pop())}</code>")
    return " · ".join(shown)


def _render(run: _Run, stats: TimelineStats, title: str) -> str:
    placed = [tx for tx in run.transactions if tx.start_us is not None]
    starts = [(tx.start_us or 0.0) - (tx.queue_age_ms or 0.0) * 1000 for tx in placed]
    ends = [(tx.start_us or 0.0) + tx.duration_ms * 1000 for tx in placed]
    ends += [span.start_us + span.duration_ms * 1000 for tx in placed for span in tx.spans]
    origin_us = min(starts, default=0.0)
    range_ms = max((max(ends, default=0.0) - origin_us) / 1000, 1.0)
    ticks, grid = _axis(range_ms)
    started = datetime.fromtimestamp(origin_us / 1e6, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    notes: list[str] = []
    if unplaced := len(run.transactions) - len(placed):
        notes.append(f"{unplaced} transactions without a timestamp are not drawn")
    if run.orphan_spans:
        notes.append(f"{run.orphan_spans} spans without a known transaction are not drawn")
    figures = [
        ("transactions", str(stats.transactions)),
        ("spans", str(stats.spans)),
        ("failures", str(stats.failures)),
        ("errors", str(stats.errors)),
        ("makespan", _ms(stats.makespan_ms)),
        ("p50", _ms(stats.p50_ms)),
        ("p99", _ms(stats.p99_ms)),
    ]
    rejected = sum(_bad_records(tx) == "rejected" for tx in run.transactions)
    figures.insert(3, ("rejected", str(rejected)))
    cards = "".join(
        f'<div class="c{" bad" if name in ("failures", "rejected") and value != "0" else ""}"'
        f' data-stat="{name}">'
        f"<b>{_esc(value)}</b>{name}</div>"
        for name, value in figures
    )
    rows = "\n".join(_row(tx, origin_us, range_ms) for tx in placed)
    run_labels = _run_labels(run.transactions)
    return "".join(
        [
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n",
            f"<header><h1>{_esc(title)}</h1><p>t = 0 at {started} UTC"
            f"{' · ' + run_labels if run_labels else ''}</p>",
            f'<div class="cards">{cards}</div>',
            _header_charts(placed),
            f'<div class="legend">{_LEGEND}</div>',
            "".join(f'<p class="note">{_esc(note)}</p>' for note in notes),
            "</header>\n",
            f'<div class="ax"><div class="l">seconds since t = 0</div><div class="k">{ticks}</div></div>\n',
            f'<main><div class="grid">{grid}</div>\n{rows}\n</main>',
            f'<div id="tip" hidden></div><script>{_JS}</script></body></html>\n',
        ]
    )


_LEGEND = (
    "".join(
        f'<span><i class="sw {css}"></i>{name}</span>'
        for css, name in (
            ("ok", "success"),
            ("fail", "failure"),
            ("unk", "unknown"),
            ("q", "queue wait"),
            ("db", "postgresql"),
            ("es", "elasticsearch"),
            ("ext", "external"),
            ("msg", "messaging"),
            ("app", "app"),
            ("e", "error"),
        )
    )
    + '<label><input type="checkbox" id="ff"> failures only</label>'
)

_CSS = """
:root{--lw:250px;--pad:24px;font:13px/1.35 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2327}
body{margin:0;background:#fafbfc}
header{padding:14px 20px 8px}h1{font-size:18px;margin:0 0 2px}header p{margin:0 0 8px;color:#555}
code{font:12px ui-monospace,monospace;background:#eef0f2;padding:0 3px;border-radius:3px}
.cards{display:flex;gap:8px;flex-wrap:wrap;margin-bottom:8px}
.c{background:#fff;border:1px solid #dde1e5;border-radius:6px;padding:4px 12px;color:#666;font-size:12px}
.c b{display:block;font-size:18px;color:#1d2327}.c.bad b{color:#c62828}
.legend{display:flex;gap:14px;flex-wrap:wrap;align-items:center;color:#444;font-size:12px}
.legend label{margin-left:auto;cursor:pointer}
.legend .sw{display:inline-block;position:static;width:14px;height:10px;margin:0 4px 0 0;vertical-align:-1px;
border-radius:2px}
.note{color:#8a6d00}
.r,.ax{display:flex;align-items:stretch}
.l{flex:0 0 var(--lw);box-sizing:border-box;padding:0 10px;white-space:nowrap;overflow:hidden;
text-overflow:ellipsis;display:flex;align-items:center;gap:4px}
.l small{color:#777}.l em{margin-left:auto;font:11px ui-monospace,monospace;color:#555;font-style:normal}
.k{position:relative;flex:1;margin-right:var(--pad)}
.ax{position:sticky;top:0;z-index:3;background:#fafbfc;border-bottom:1px solid #cfd4d9;height:24px}
.ax .l{color:#777;font-size:11px}
.ax span{position:absolute;bottom:3px;transform:translateX(-50%);font:11px ui-monospace,monospace;color:#444;
white-space:nowrap}
.ax span:first-child{transform:none}
main{position:relative;padding-bottom:12px}
.grid{position:absolute;top:0;bottom:0;left:var(--lw);right:var(--pad);pointer-events:none}
.grid i{position:absolute;top:0;bottom:0;border-left:1px solid #e6e9ec}
.r{height:24px;border-bottom:1px solid #f0f2f4;position:relative;z-index:1;
content-visibility:auto;contain-intrinsic-size:auto 24px}
.r:hover{background:#eef4ff}
.t,.q{position:absolute;top:3px;box-sizing:border-box;min-width:1px}
.t{height:18px;border:1px solid;border-radius:3px}
.ok{background:#c8e6c9;border-color:#2e7d32}.fail{background:#ffcdd2;border-color:#c62828}
.unk{background:#e0e0e0;border-color:#757575}
.q{height:18px;border:1px dashed #90a4ae;border-right:0;border-radius:3px 0 0 3px;
background:repeating-linear-gradient(135deg,#cfd8dc 0 2px,transparent 2px 6px)}
.s{position:absolute;top:3px;height:6px;min-width:1px;border-radius:1px}
.db{background:#1e63c4}.es{background:#00897b}.ext{background:#ef6c00}.msg{background:#8e24aa}
.app{background:#546e7a}.oth{background:#9e9e9e}
.s.x{background:#d32f2f;outline:1px solid #7f0000}
.e{position:absolute;top:-4px;width:8px;height:8px;margin-left:-4px;background:#d32f2f;transform:rotate(45deg);
border:1px solid #fff}
.legend .sw.q{height:10px}.legend .sw.e{width:8px;height:8px;transform:rotate(45deg);margin:0 6px 0 3px}
.ff .r:not([data-outcome=failure]):not([data-records]){display:none}
.rj{color:#fff;background:#c62828;border-radius:3px;padding:0 4px;font-size:11px}
.charts{display:flex;gap:16px;margin-bottom:8px}.charts figure{margin:0;flex:1;max-width:520px}
.charts .bars{display:flex;align-items:flex-end;gap:1px;height:48px;background:#fff;border:1px solid #dde1e5}
.charts .bars i{flex:1;background:#5c7cfa;min-height:0}
.charts figcaption{font-size:11px;color:#666}
#tip{position:fixed;z-index:9;max-width:460px;padding:6px 9px;background:#263238;color:#fff;border-radius:4px;
font-size:12px;white-space:pre-line;pointer-events:none;box-shadow:0 2px 8px #0004}
#tip::first-line{font-weight:600}
"""

# Moves each hovered element's title into a styled tooltip; without JS the native title still works.
_JS = """
(function(){var tip=document.getElementById('tip');
function find(n){while(n&&n.nodeType===1){if(n.title||n.dataset.tip)return n;n=n.parentNode;}return null;}
document.addEventListener('mouseover',function(e){var el=find(e.target);if(!el){tip.hidden=true;return;}
if(el.title){el.dataset.tip=el.title;el.removeAttribute('title');}tip.textContent=el.dataset.tip;tip.hidden=false;});
document.addEventListener('mousemove',function(e){if(tip.hidden)return;
var x=e.clientX+14,y=e.clientY+14,w=tip.offsetWidth,h=tip.offsetHeight;
if(x+w>innerWidth)x=e.clientX-w-8;if(y+h>innerHeight)y=e.clientY-h-8;tip.style.left=x+'px';tip.style.top=y+'px';});
document.addEventListener('mouseleave',function(){tip.hidden=true;});
document.getElementById('ff').addEventListener('change',function(){document.body.classList.toggle('ff',this.checked);});
})();
"""

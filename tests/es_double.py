"""An HTTP double of Elasticsearch's search API (``_search``), for the usage source's integration tests.

No Elasticsearch server can run on these machines, so the real ``AsyncElasticsearch`` client talks to
this aiohttp application instead (run it with ``billing_local.emulators.server.BackgroundServer``).

What it follows (Elasticsearch 9.x reference: Search API, REST API compatibility, API keys, Query DSL,
date_histogram / terms / sum aggregations, shard failures):

- Routes: ``GET`` and ``POST`` ``/_search`` and ``/{target}/_search``. ``target`` is a comma list of
  index names, ``*`` patterns, ``_all`` and ``-pattern`` exclusions. Patterns do not match names
  starting with ``.`` unless they start with ``.`` themselves. A missing concrete index is a 404
  ``index_not_found_exception`` (unless ``ignore_unavailable``); a pattern matching nothing gives an
  empty result (``allow_no_indices`` defaults to true).
- Headers: every response carries ``X-Elastic-Product: Elasticsearch``. ``Accept`` / ``Content-Type``
  may be ``application/json`` or ``application/vnd.elasticsearch+json; compatible-with=N`` with N 8 or
  9; asking for compatibility on one header and not the other, different versions, or another version
  is a 400 ``media_type_header_exception``. A body with a missing or non-JSON ``Content-Type`` is a 406
  (Elasticsearch's plain-string error). The response's ``Content-Type`` echoes what was asked:
  ``application/vnd.elasticsearch+json;compatible-with=N`` or ``application/json``.
- Security: when API keys are configured, ``Authorization: ApiKey <base64(id:key)>`` is required; no
  credentials or an unknown key is a 401 ``security_exception`` with a ``WWW-Authenticate`` header.
- Query DSL: ``match_all``, ``bool`` (``filter``, ``must``, ``must_not``, ``should`` with an integer
  ``minimum_should_match``), ``term`` (keyword semantics, ``case_insensitive``), ``terms``, ``exists``
  and ``range`` (``gt``/``gte``/``lt``/``lte`` on dates given as ``strict_date_optional_time`` text or
  epoch millis, missing date parts rounded up for ``gt``/``lte`` as documented, and on numbers).
- Search parameters: ``size`` (must be 0: hits are not implemented), ``track_total_hits`` (true, false,
  or an integer; default 10,000), ``allow_partial_search_results`` (default true), in the body or the
  query string (the query string wins).
- Aggregations: ``date_histogram`` (``fixed_interval`` ms/s/m/h/d, ``calendar_interval``
  minute/hour/day, ``time_zone`` UTC only, ``min_doc_count`` with gap filling at 0), ``terms``
  (``size``, ``min_doc_count``, ordered by ``doc_count`` desc then key asc, ``sum_other_doc_count``)
  and ``sum`` (summed in double precision with compensation, like Elasticsearch, so 0.1 + 0.2 is
  0.30000000000000004 here as it is there), nested under ``aggs`` or ``aggregations``.
- Response: ``took``, ``timed_out``, ``_shards`` (with ``failures`` when shards failed), ``hits``
  (``total`` per ``track_total_hits``, ``max_score`` null, ``hits`` empty), ``aggregations``; date
  buckets have ``key`` (epoch millis) and ``key_as_string`` (``2026-11-26T13:00:00.000Z``).
- Shard failures: an index named in ``EsState.failing_indices`` has its (single) shard fail. With
  ``allow_partial_search_results`` true the answer is 200 with ``_shards.failed`` and the rest of the
  data; with false, or when every shard failed, it is a 503 ``search_phase_execution_exception``.

Where it is simplified, and what it does instead of guessing:

- One shard per index; terms counts are exact (``doc_count_error_upper_bound`` is 0).
- No mappings: string values compare as keywords, dates have millisecond resolution and no offset
  means UTC, numeric values (and numeric strings, as with ``coerce``) are doubles. Field names with
  dots are looked up flat first, then as object paths. Multi-valued (list) fields are supported.
- Numbers are written by Python's ``json`` (shortest repr, e.g. ``10000000.0``) where Elasticsearch
  writes Java's ``Double.toString`` (``1.0E7``): the same double either way.
- Anything outside the subset above (another query or aggregation type, date math, scripts, another
  time zone, ``size`` > 0, an unknown parameter) is a 400 in Elasticsearch's error shape, so a test
  never passes on data the double did not really compute. Error ``type`` names are Elasticsearch's;
  ``reason`` texts are paraphrased.

Fault injection: ``fail_next`` queues forced answers (429 carries the documented
``es_rejected_execution_exception`` body, 503 / 504 theirs, or a body of your own), ``delay_next``
holds requests (released at shutdown) so client timeouts fire, and ``requests`` logs every request.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import contextlib
import json
import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

PRODUCT_HEADER = {"X-Elastic-Product": "Elasticsearch"}
COMPATIBLE_VERSIONS = (8, 9)
DEFAULT_TRACK_TOTAL_HITS = 10_000
HISTOGRAM_BUCKET_LIMIT = 65_536  # search.max_buckets: refuse to fill absurd gaps

_MEDIA = re.compile(
    r"^\s*(?P<type>[a-z*]+)/(?P<vnd>vnd\.elasticsearch\+)?(?P<sub>[a-z0-9.*+-]+)\s*"
    r"(?:;\s*compatible-with\s*=\s*(?P<version>\d+))?\s*(?:;.*)?$",
    re.IGNORECASE,
)
_DATE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<mo>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<h>\d{2})(?::(?P<mi>\d{2})(?::(?P<s>\d{2})(?:[.,](?P<f>\d{1,9}))?)?)?"
    r"(?P<tz>Z|[+-]\d{2}(?::?\d{2})?)?)?)?)?$"
)
_FIXED = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_CALENDAR_MS = {
    "minute": 60_000,
    "1m": 60_000,
    "hour": 3_600_000,
    "1h": 3_600_000,
    "day": 86_400_000,
    "1d": 86_400_000,
}
_UTC_ZONES = {"UTC", "Z", "+00:00", "-00:00", "Etc/UTC", "GMT", "Etc/GMT"}
_SEARCH_PARAMS = {
    "allow_partial_search_results",
    "track_total_hits",
    "size",
    "ignore_unavailable",
    "allow_no_indices",
    "pretty",
    "human",
    "error_trace",
}
_BODY_KEYS = {"query", "aggs", "aggregations", "size", "track_total_hits", "from"}


def api_key(key_id: str, secret: str) -> str:
    """The encoded credential (base64 of ``id:api_key``) as the create API key API returns it."""
    return base64.b64encode(f"{key_id}:{secret}".encode()).decode()


class EsError(Exception):
    """An error answered in Elasticsearch's shape: ``{"error": {...}, "status": N}``."""

    def __init__(
        self, status: int, type_: str, reason: str, headers: Mapping[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.headers = dict(headers or {})
        cause = {"type": type_, "reason": reason, **extra}
        self.body: Any = {"error": {"root_cause": [cause], **cause}, "status": status}


def _bad(reason: str, type_: str = "parsing_exception") -> EsError:
    return EsError(400, type_, reason)


def _unsupported(what: str) -> EsError:
    return _bad(f"[es_double] {what} is not supported by the double")


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    status: int = 0

    @property
    def is_search(self) -> bool:
        return self.path.rstrip("/").endswith("_search")


@dataclass
class Fault:
    status: int | None = None  # answer this status instead of searching
    body: Any = None  # its body (None: Elasticsearch's documented body for the status)
    delay_s: float = 0.0  # hold the request this long first


def _fault_body(status: int) -> Any:
    if status == 429:
        return EsError(
            429,
            "es_rejected_execution_exception",
            "rejected execution of TimedRunnable on TaskExecutionTimeTrackingEsThreadPoolExecutor"
            "[name = node-1/search, queue capacity = 1000, active threads = 13, queued tasks = 1000]",
        ).body
    if status == 503:
        return EsError(
            503,
            "search_phase_execution_exception",
            "all shards failed",
            phase="query",
            grouped=True,
            failed_shards=[],
        ).body
    if status == 504:
        return EsError(504, "timeout_exception", "the request timed out at the proxy").body
    return EsError(status, "status_exception", f"forced status {status}").body


@dataclass
class EsState:
    """The double's indices, credentials, faults and request log (thread-safe: tests run elsewhere)."""

    indices: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    api_keys: set[str] = field(default_factory=set)  # encoded keys accepted; empty: security disabled
    failing_indices: set[str] = field(default_factory=set)
    faults: deque[Fault] = field(default_factory=deque)
    requests: list[LoggedRequest] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)  # bugs of the double itself (answered 500)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def index(self, name: str, *docs: Mapping[str, Any]) -> None:
        """Add documents (their ``_source``) to an index, creating it."""
        with self.lock:
            self.indices.setdefault(name, []).extend(dict(d) for d in docs)

    def create_index(self, name: str) -> None:
        with self.lock:
            self.indices.setdefault(name, [])

    def fail_next(self, status: int, times: int = 1, body: Any = None) -> None:
        """The next ``times`` requests get ``status`` (and Elasticsearch's body for it, or ``body``)."""
        with self.lock:
            self.faults.extend(Fault(status=status, body=body) for _ in range(times))

    def delay_next(self, seconds: float, times: int = 1) -> None:
        """Hold the next ``times`` requests for ``seconds`` before answering them normally."""
        with self.lock:
            self.faults.extend(Fault(delay_s=seconds) for _ in range(times))

    @property
    def searches(self) -> list[LoggedRequest]:
        with self.lock:
            return [r for r in self.requests if r.is_search]

    def _next_fault(self) -> Fault | None:
        with self.lock:
            return self.faults.popleft() if self.faults else None

    def _log(self, entry: LoggedRequest) -> None:
        with self.lock:
            self.requests.append(entry)


# ---------------------------------------------------------------------------------------------- HTTP


def create_app(state: EsState) -> web.Application:
    """The aiohttp application serving ``state``."""
    app = web.Application(client_max_size=100 * 1024 * 1024)
    released = asyncio.Event()

    async def release(_: web.Application) -> None:
        released.set()  # delayed requests end at shutdown instead of holding it up

    app.on_shutdown.append(release)

    async def search(request: web.Request) -> web.Response:
        raw = await request.read()
        started = time.monotonic()
        compat: int | None = None
        try:
            compat = _check_media_types(request, has_body=bool(raw))
            body = _parse_body(raw)
            status, payload, headers = await _answer(state, request, body, started, released)
        except EsError as exc:
            status, payload, headers = exc.status, exc.body, exc.headers
            body = _try_json(raw)
        except Exception as exc:  # a bug of the double: say so loudly, in Elasticsearch's shape
            state.errors.append(exc)
            error = EsError(500, "es_double_internal_error", repr(exc))
            status, payload, headers = error.status, error.body, {}
            body = _try_json(raw)
        state._log(
            LoggedRequest(
                request.method, request.path, dict(request.query), dict(request.headers), body, status
            )
        )
        content_type = (
            f"application/vnd.elasticsearch+json;compatible-with={compat}" if compat else "application/json"
        )
        return web.Response(
            status=status,
            body=json.dumps(payload).encode(),
            headers={**PRODUCT_HEADER, **headers, "Content-Type": content_type},
        )

    async def anything_else(request: web.Request) -> web.Response:
        await request.read()
        state._log(
            LoggedRequest(request.method, request.path, dict(request.query), dict(request.headers), None, 400)
        )
        error = _bad(
            f"no handler found for uri [{request.path}] and method [{request.method}]",
            "illegal_argument_exception",
        )
        return web.json_response(error.body, status=400, headers=PRODUCT_HEADER)

    app.router.add_route("GET", "/_search", search)
    app.router.add_route("POST", "/_search", search)
    app.router.add_route("GET", "/{target}/_search", search)
    app.router.add_route("POST", "/{target}/_search", search)
    app.router.add_route("*", "/{tail:.*}", anything_else)
    return app


def _try_json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode(errors="replace")


def _parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise _bad(f"failed to parse the request body: {exc}", "x_content_parse_exception") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", "x_content_parse_exception")
    return body


def _media(value: str) -> tuple[str, int | None] | None:
    """(``type/subtype`` without the vnd prefix, compatible-with version) or None if unparseable."""
    match = _MEDIA.match(value)
    if match is None:
        return None
    version = match["version"]
    if match["vnd"] and version is None:
        return None  # the vendor type is only meaningful with a version
    return f"{match['type'].lower()}/{match['sub'].lower()}", int(version) if version else None


def _check_media_types(request: web.Request, *, has_body: bool) -> int | None:
    """Validate Accept / Content-Type as Elasticsearch's REST layer does; return the compat version."""
    accept_header = request.headers.get("Accept")
    content_header = request.headers.get("Content-Type") if has_body else None
    accept = _media(accept_header) if accept_header else None
    content = _media(content_header) if content_header else None
    versions = {
        name: parsed[1]
        for name, parsed in (("Accept", accept), ("Content-Type", content))
        if parsed and parsed[1]
    }

    def invalid(detail: str) -> EsError:
        error = EsError(
            400, "media_type_header_exception", "Invalid media-type value on headers [Accept, Content-Type]"
        )
        error.body["error"]["caused_by"] = {"type": "status_exception", "reason": detail}
        return error

    for name, version in versions.items():
        if version not in COMPATIBLE_VERSIONS:
            raise invalid(
                f"{name} version must be either version 8 or 9, but found {version}. "
                f"{name}={request.headers.get(name)}"
            )
    if versions and (
        (accept_header is not None and "Accept" not in versions)
        or (content_header is not None and "Content-Type" not in versions)
        or len(set(versions.values())) > 1
    ):
        raise invalid(
            "A compatible version is required on both Content-Type and Accept headers if either one "
            "has requested a compatible version and the compatible versions must match. "
            f"Accept={accept_header}, Content-Type={content_header}"
        )
    if accept_header is not None and (
        accept is None or accept[0] not in {"application/json", "application/*", "*/*"}
    ):
        raise invalid(f"Accept header [{accept_header}] is not supported by the double (JSON only)")
    if has_body and (content is None or content[0] != "application/json"):
        raise _not_acceptable(content_header or "")
    return next(iter(versions.values()), None)


def _not_acceptable(content_type: str) -> EsError:
    """Elasticsearch answers an unsupported Content-Type with a plain-string error and 406."""
    error = EsError(406, "", "")
    error.body = {"error": f"Content-Type header [{content_type}] is not supported", "status": 406}
    return error


def _check_api_key(state: EsState, request: web.Request) -> None:
    with state.lock:
        keys = set(state.api_keys)
    if not keys:
        return
    challenge = {
        "WWW-Authenticate": 'Basic realm="security", charset="UTF-8", Bearer realm="security", ApiKey'
    }
    header = request.headers.get("Authorization")
    if not header:
        raise EsError(
            401,
            "security_exception",
            f"missing authentication credentials for REST request [{request.path_qs}]",
            challenge,
            header={
                "WWW-Authenticate": [
                    'Basic realm="security", charset="UTF-8"',
                    'Bearer realm="security"',
                    "ApiKey",
                ]
            },
        )
    scheme, _, credential = header.partition(" ")
    if scheme != "ApiKey" or credential.strip() not in keys:
        raise EsError(
            401,
            "security_exception",
            "unable to authenticate with provided credentials and anonymous access is not allowed "
            "for this request",
            challenge,
            additional_unsuccessful_credentials="API key: invalid API key",
        )


async def _answer(
    state: EsState, request: web.Request, body: dict[str, Any], started: float, released: asyncio.Event
) -> tuple[int, Any, dict[str, str]]:
    fault = state._next_fault()
    if fault is not None and fault.delay_s:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(released.wait(), fault.delay_s)
    _check_api_key(state, request)
    if fault is not None and fault.status is not None:
        return fault.status, fault.body if fault.body is not None else _fault_body(fault.status), {}
    with state.lock:
        indices = {name: list(docs) for name, docs in state.indices.items()}
        failing = set(state.failing_indices)
    search = Search(dict(request.query), body, request.match_info.get("target"))
    return 200, search.run(indices, failing, started), {}


# -------------------------------------------------------------------------------------------- search


def _bool_param(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("true", ""):
        return True
    if value == "false":
        return False
    raise _bad(
        f"Failed to parse value [{value}] as only [true] or [false] are allowed.",
        "illegal_argument_exception",
    ) from None


def _int_param(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise _bad(f"[{name}] must be an integer, got [{value}]", "illegal_argument_exception")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _bad(f"[{name}] must be an integer, got [{value}]", "illegal_argument_exception") from None


class Search:
    """One ``_search`` request, evaluated over in-memory documents."""

    def __init__(self, query: dict[str, str], body: dict[str, Any], target: str | None) -> None:
        unknown = set(query) - _SEARCH_PARAMS
        if unknown:
            raise _bad(
                f"request [/{target or ''}/_search] contains unrecognized parameter: [{sorted(unknown)[0]}]"
                " (or one the double does not implement)",
                "illegal_argument_exception",
            )
        unknown = set(body) - _BODY_KEYS
        if unknown:
            raise _unsupported(f"search body key [{sorted(unknown)[0]}]")
        if "aggs" in body and "aggregations" in body:
            raise _bad("Found two aggregation type definitions: [aggs] and [aggregations]")
        self.target = target or "_all"
        self.size = _int_param(query.get("size", body.get("size", 10)), "size")
        if self.size != 0:
            raise _unsupported("returning hits (size > 0)")
        if _int_param(body.get("from", 0), "from") != 0:
            raise _unsupported("[from] other than 0")
        self.track_total_hits: bool | int = DEFAULT_TRACK_TOTAL_HITS
        tth = query.get("track_total_hits", body.get("track_total_hits", DEFAULT_TRACK_TOTAL_HITS))
        if isinstance(tth, bool) or tth in ("true", "false"):
            self.track_total_hits = _bool_param(tth, "track_total_hits")
        else:
            self.track_total_hits = _int_param(tth, "track_total_hits")
            if self.track_total_hits < -1:
                raise _bad(
                    "[track_total_hits] parameter must be positive or equals to -1",
                    "illegal_argument_exception",
                )
        self.allow_partial = _bool_param(
            query.get("allow_partial_search_results", True), "allow_partial_search_results"
        )
        self.ignore_unavailable = _bool_param(query.get("ignore_unavailable", False), "ignore_unavailable")
        self.allow_no_indices = _bool_param(query.get("allow_no_indices", True), "allow_no_indices")
        self.query = compile_query(body.get("query", {"match_all": {}}))
        aggs = body.get("aggs", body.get("aggregations"))
        self.aggs = compile_aggs(aggs) if aggs is not None else None

    def resolve(self, names: Iterable[str]) -> list[str]:
        """The indices ``target`` names, in name order."""
        existing = sorted(names)
        chosen: list[str] = []
        for raw in self.target.split(","):
            expr = raw.strip()
            if not expr:
                continue
            exclude = expr.startswith("-") and bool(chosen)
            if exclude:
                expr = expr[1:]
            if expr in ("_all", "*"):
                matched = [n for n in existing if not n.startswith(".")]
            elif "*" in expr:
                pattern = re.compile("^" + ".*".join(re.escape(p) for p in expr.split("*")) + "$")
                matched = [
                    n
                    for n in existing
                    if pattern.match(n) and (expr.startswith(".") or not n.startswith("."))
                ]
                if not matched and not self.allow_no_indices:
                    raise _index_not_found(expr)
            else:
                matched = [expr] if expr in existing else []
                if not matched and not exclude and not self.ignore_unavailable:
                    raise _index_not_found(expr)
            if exclude:
                chosen = [n for n in chosen if n not in matched]
            else:
                chosen.extend(n for n in matched if n not in chosen)
        return sorted(chosen)

    def run(
        self, indices: dict[str, list[dict[str, Any]]], failing: set[str], started: float
    ) -> dict[str, Any]:
        targets = self.resolve(indices)
        failed = [n for n in targets if n in failing]
        failures = [
            {
                "shard": 0,
                "index": n,
                "node": "es-double-node",
                "reason": {
                    "type": "no_shard_available_action_exception",
                    "reason": f"[{n}][0] no shard available",
                },
            }
            for n in failed
        ]
        if failed and (not self.allow_partial or len(failed) == len(targets)):
            reason = "all shards failed" if len(failed) == len(targets) else "Partial shards failure"
            raise EsError(
                503,
                "search_phase_execution_exception",
                reason,
                phase="query",
                grouped=True,
                failed_shards=failures,
            )
        docs = [d for n in targets if n not in failing for d in indices[n] if self.query(d)]
        hits: dict[str, Any] = {"max_score": None, "hits": []}
        if self.track_total_hits is True or self.track_total_hits == -1:
            hits = {"total": {"value": len(docs), "relation": "eq"}, **hits}
        elif self.track_total_hits is not False:
            limit = int(self.track_total_hits)
            relation = "gte" if len(docs) > limit else "eq"
            hits = {"total": {"value": min(len(docs), limit), "relation": relation}, **hits}
        shards: dict[str, Any] = {
            "total": len(targets),
            "successful": len(targets) - len(failed),
            "skipped": 0,
            "failed": len(failed),
        }
        if failures:
            shards["failures"] = failures
        response: dict[str, Any] = {
            "took": int((time.monotonic() - started) * 1000),
            "timed_out": False,
            "_shards": shards,
            "hits": hits,
        }
        if self.aggs is not None:
            response["aggregations"] = {name: agg(docs) for name, agg in self.aggs.items()}
        return response


def _index_not_found(name: str) -> EsError:
    error = EsError(404, "index_not_found_exception", f"no such index [{name}]")
    details = {"resource.type": "index_or_alias", "resource.id": name, "index_uuid": "_na_", "index": name}
    error.body["error"].update(details)
    error.body["error"]["root_cause"][0].update(details)
    return error


# ------------------------------------------------------------------------------------------- values


def values_of(doc: Mapping[str, Any], name: str) -> list[Any]:
    """A field's values: flat key first, then the object path; lists flattened, nulls dropped."""
    if name in doc:
        found: Any = doc[name]
    else:
        found = doc
        for part in name.split("."):
            if isinstance(found, Mapping) and part in found:
                found = found[part]
            else:
                return []
    items = found if isinstance(found, list) else [found]
    return [v for v in items if v is not None and not isinstance(v, Mapping)]


def keyword(value: Any) -> str:
    """A value as a keyword field indexes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


def number(value: Any, field_name: str) -> float:
    if isinstance(value, bool):
        raise _bad(f"field [{field_name}] holds a boolean, not a number", "illegal_argument_exception")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _bad(
            f"field [{field_name}] value [{value}] is not a number", "illegal_argument_exception"
        ) from None


def date_millis(value: Any, *, round_up: bool = False) -> int:
    """Epoch millis of a ``strict_date_optional_time`` text or epoch millis number (no offset: UTC).

    ``round_up`` fills missing parts with their largest value, as ``gt`` and ``lte`` range bounds do.
    """
    if isinstance(value, bool):
        raise _bad(f"failed to parse date field [{value}]", "illegal_argument_exception")
    if isinstance(value, int | float):
        return math.floor(value)
    if not isinstance(value, str):
        raise _bad(f"failed to parse date field [{value}]", "illegal_argument_exception")
    if value.startswith("now") or "||" in value:
        raise _unsupported(f"date math [{value}]")
    if re.fullmatch(r"-?\d+", value) and len(value) > 4:
        return int(value)  # epoch_millis written as text
    m = _DATE.match(value)
    if m is None:
        raise _bad(
            f"failed to parse date field [{value}] with format [strict_date_optional_time||epoch_millis]",
            "parse_exception",
        )

    def part(key: str, default: int) -> int:
        return int(m[key]) if m[key] else default

    fraction = (m["f"] or "").ljust(9, "0")
    try:
        moment = datetime(
            int(m["y"]),
            part("mo", 1),
            part("d", 1),
            part("h", 0),
            part("mi", 0),
            part("s", 0),
            int(fraction[:6]),
            tzinfo=UTC,
        )
    except ValueError:
        raise _bad(f"failed to parse date field [{value}]", "parse_exception") from None
    if m["tz"] and m["tz"] != "Z":
        sign = 1 if m["tz"][0] == "+" else -1
        digits = m["tz"][1:].replace(":", "")
        moment -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0))
    millis = calendar.timegm(moment.timetuple()) * 1000 + moment.microsecond // 1000
    if round_up and m["f"] is None:
        millis = _round_up(moment, millis, m)
    return millis


def _round_up(moment: datetime, millis: int, m: re.Match[str]) -> int:
    """The last millisecond of the most precise unit the text gave."""
    if m["s"] is not None:
        return millis + 999
    if m["mi"] is not None:
        return millis + 59_999
    if m["h"] is not None:
        return millis + 3_599_999
    if m["d"] is not None:
        return millis + 86_399_999
    if m["mo"] is not None:
        days = calendar.monthrange(moment.year, moment.month)[1]
        return millis + days * 86_400_000 - 1
    days = 366 if calendar.isleap(moment.year) else 365
    return millis + days * 86_400_000 - 1


# -------------------------------------------------------------------------------------------- queries

Predicate = Any  # Callable[[Mapping[str, Any]], bool]


def _single(spec: Any, kind: str) -> tuple[str, Any]:
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise _bad(f"[{kind}] query malformed, expected a single field")
    ((name, value),) = spec.items()
    return name, value


def compile_query(spec: Any) -> Predicate:
    """A predicate over ``_source`` documents; anything outside the supported DSL is a 400."""
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise _bad("query malformed, must start with a single query type")
    ((kind, params),) = spec.items()
    if kind == "match_all":
        return lambda doc: True
    if kind == "bool":
        return _compile_bool(params)
    if kind == "term":
        return _compile_term(params)
    if kind == "terms":
        name, wanted = _single({k: v for k, v in params.items() if k != "boost"}, "terms")
        if not isinstance(wanted, list):
            raise _unsupported("terms lookup")
        wanted_set = {keyword(w) for w in wanted}
        return lambda doc: any(keyword(v) in wanted_set for v in values_of(doc, name))
    if kind == "exists":
        name = params.get("field")
        if not isinstance(name, str):
            raise _bad("[exists] must be provided with a [field]")
        return lambda doc: bool(values_of(doc, name))
    if kind == "range":
        return _compile_range(params)
    raise _bad(f"unknown query [{kind}]")


def _clauses(value: Any) -> list[Predicate]:
    items = value if isinstance(value, list) else [value]
    return [compile_query(item) for item in items]


def _compile_bool(params: Any) -> Predicate:
    if not isinstance(params, Mapping):
        raise _bad("[bool] query malformed")
    unknown = set(params) - {"filter", "must", "must_not", "should", "minimum_should_match", "boost", "_name"}
    if unknown:
        raise _bad(f"[bool] query does not support [{sorted(unknown)[0]}]")
    required = _clauses(params.get("filter", [])) + _clauses(params.get("must", []))
    excluded = _clauses(params.get("must_not", []))
    optional = _clauses(params.get("should", []))
    msm = params.get("minimum_should_match", 0 if required or not optional else 1)
    if isinstance(msm, str) and re.fullmatch(r"-?\d+", msm):
        msm = int(msm)
    if not isinstance(msm, int) or isinstance(msm, bool):
        raise _unsupported(f"minimum_should_match [{msm}]")
    needed = msm if msm >= 0 else max(len(optional) + msm, 0)

    def matches(doc: Mapping[str, Any]) -> bool:
        return (
            all(p(doc) for p in required)
            and not any(p(doc) for p in excluded)
            and sum(1 for p in optional if p(doc)) >= needed
        )

    return matches


def _compile_term(params: Any) -> Predicate:
    name, value = _single(params, "term")
    insensitive = False
    if isinstance(value, Mapping):
        unknown = set(value) - {"value", "boost", "case_insensitive", "_name"}
        if unknown or "value" not in value:
            raise _bad(
                f"[term] query does not support [{sorted(unknown)[0] if unknown else 'missing value'}]"
            )
        insensitive = bool(value.get("case_insensitive", False))
        value = value["value"]
    wanted = keyword(value)
    if insensitive:
        return lambda doc: any(keyword(v).lower() == wanted.lower() for v in values_of(doc, name))
    return lambda doc: any(keyword(v) == wanted for v in values_of(doc, name))


def _compile_range(params: Any) -> Predicate:
    name, bounds = _single(params, "range")
    if not isinstance(bounds, Mapping):
        raise _bad("[range] query malformed, no start_object after query name")
    unknown = set(bounds) - {"gt", "gte", "lt", "lte", "format", "time_zone", "boost", "relation", "_name"}
    if unknown:
        raise _bad(f"[range] query does not support [{sorted(unknown)[0]}]")
    fmt = bounds.get("format")
    if fmt is not None and not set(str(fmt).split("||")) <= {
        "strict_date_optional_time",
        "date_optional_time",
        "epoch_millis",
    }:
        raise _unsupported(f"range format [{fmt}]")
    if bounds.get("time_zone", "UTC") not in _UTC_ZONES:
        raise _unsupported(f"range time_zone [{bounds['time_zone']}]")
    if bounds.get("relation", "intersects").lower() != "intersects":
        raise _unsupported("range relation other than intersects")
    limits = {op: bounds[op] for op in ("gt", "gte", "lt", "lte") if bounds.get(op) is not None}
    dates = any(isinstance(v, str) for v in limits.values())

    def comparable(value: Any, op: str | None = None) -> float:
        if dates or isinstance(value, str):
            return float(date_millis(value, round_up=op in ("gt", "lte")))
        return number(value, name)

    resolved = {op: comparable(v, op) for op, v in limits.items()}

    def inside(v: float) -> bool:
        return (
            ("gt" not in resolved or v > resolved["gt"])
            and ("gte" not in resolved or v >= resolved["gte"])
            and ("lt" not in resolved or v < resolved["lt"])
            and ("lte" not in resolved or v <= resolved["lte"])
        )

    return lambda doc: any(inside(comparable(v)) for v in values_of(doc, name))


# --------------------------------------------------------------------------------------- aggregations

Aggregator = Any  # Callable[[list[Mapping[str, Any]]], dict[str, Any]]


def compile_aggs(spec: Any) -> dict[str, Aggregator]:
    if not isinstance(spec, Mapping):
        raise _bad("Expected [START_OBJECT] under [aggregations]")
    compiled: dict[str, Aggregator] = {}
    for name, body in spec.items():
        if not isinstance(body, Mapping):
            raise _bad(f"Expected [START_OBJECT] under [{name}]")
        subs_spec = body.get("aggs", body.get("aggregations"))
        kinds = [k for k in body if k not in ("aggs", "aggregations", "meta")]
        if len(kinds) != 1:
            raise _bad(f"Expected exactly one aggregation type for [{name}], found {kinds}")
        kind = kinds[0]
        subs = compile_aggs(subs_spec) if subs_spec is not None else {}
        if kind == "date_histogram":
            compiled[name] = _date_histogram(body[kind], subs)
        elif kind == "terms":
            compiled[name] = _terms(body[kind], subs)
        elif kind == "sum":
            if subs:
                raise _bad(
                    f"Aggregator [{name}] of type [sum] cannot accept sub-aggregations",
                    "aggregation_initialization_exception",
                )
            compiled[name] = _sum(body[kind])
        else:
            raise _bad(
                f"Unknown aggregation type [{kind}] did you mean one the double supports: "
                "date_histogram, terms, sum?",
                "named_object_not_found_exception",
            )
    return compiled


def _fields(params: Any, kind: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(params, Mapping):
        raise _bad(f"[{kind}] aggregation malformed")
    unknown = set(params) - allowed
    if unknown:
        raise _bad(
            f"[{kind}] unknown field [{sorted(unknown)[0]}] (or one the double does not implement)",
            "x_content_parse_exception",
        )
    if not isinstance(params.get("field"), str):
        raise _bad(
            f"Required one of fields [field, script], but none were specified. ({kind})",
            "illegal_argument_exception",
        )
    return params


def _run_subs(subs: dict[str, Aggregator], docs: list[Mapping[str, Any]]) -> dict[str, Any]:
    return {name: agg(docs) for name, agg in subs.items()}


def _date_histogram(params: Any, subs: dict[str, Aggregator]) -> Aggregator:
    p = _fields(
        params,
        "date_histogram",
        {"field", "fixed_interval", "calendar_interval", "time_zone", "min_doc_count"},
    )
    name = p["field"]
    if ("fixed_interval" in p) == ("calendar_interval" in p):
        raise _bad(
            "Exactly one of [fixed_interval] or [calendar_interval] must be specified on the "
            "[date_histogram] aggregation",
            "illegal_argument_exception",
        )
    if "fixed_interval" in p:
        m = _FIXED.match(str(p["fixed_interval"]))
        if m is None or int(m[1]) <= 0:
            raise _bad(
                f"failed to parse setting [date_histogram.fixedInterval] with value "
                f"[{p['fixed_interval']}] as a time value",
                "illegal_argument_exception",
            )
        interval = int(m[1]) * _UNIT_MS[m[2]]
    else:
        calendar_interval = str(p["calendar_interval"])
        if calendar_interval not in _CALENDAR_MS:
            raise _unsupported(f"calendar_interval [{calendar_interval}]")
        interval = _CALENDAR_MS[calendar_interval]
    if p.get("time_zone", "UTC") not in _UTC_ZONES:
        raise _unsupported(f"time_zone [{p['time_zone']}]")
    min_doc_count = _int_param(p.get("min_doc_count", 0), "min_doc_count")
    if min_doc_count < 0:
        raise _bad("[minDocCount] must be greater than or equal to 0.", "illegal_argument_exception")

    def aggregate(docs: list[Mapping[str, Any]]) -> dict[str, Any]:
        buckets: dict[int, list[Mapping[str, Any]]] = {}
        for doc in docs:
            for key in {date_millis(v) // interval * interval for v in values_of(doc, name)}:
                buckets.setdefault(key, []).append(doc)
        keys = sorted(buckets)
        if min_doc_count == 0 and keys:
            if (keys[-1] - keys[0]) // interval >= HISTOGRAM_BUCKET_LIMIT:
                raise _bad("Trying to create too many buckets.", "too_many_buckets_exception")
            keys = list(range(keys[0], keys[-1] + interval, interval))
        out = []
        for key in keys:
            members = buckets.get(key, [])
            if len(members) < min_doc_count:
                continue
            out.append(
                {
                    "key_as_string": _format_millis(key),
                    "key": key,
                    "doc_count": len(members),
                    **_run_subs(subs, members),
                }
            )
        return {"buckets": out}

    return aggregate


def _format_millis(millis: int) -> str:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=millis)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _terms(params: Any, subs: dict[str, Aggregator]) -> Aggregator:
    p = _fields(params, "terms", {"field", "size", "shard_size", "min_doc_count", "order"})
    name = p["field"]
    size = _int_param(p.get("size", 10), "size")
    if size <= 0:
        raise _bad(f"[size] must be greater than 0. Found [{size}] in [{name}]", "illegal_argument_exception")
    min_doc_count = _int_param(p.get("min_doc_count", 1), "min_doc_count")
    if min_doc_count < 1:
        raise _unsupported("terms min_doc_count 0")
    if "order" in p and p["order"] not in ({"_count": "desc"}, [{"_count": "desc"}, {"_key": "asc"}]):
        raise _unsupported(f"terms order {p['order']}")

    def aggregate(docs: list[Mapping[str, Any]]) -> dict[str, Any]:
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for doc in docs:
            for key in {keyword(v) for v in values_of(doc, name)}:
                groups.setdefault(key, []).append(doc)
        ranked = sorted(
            ((k, members) for k, members in groups.items() if len(members) >= min_doc_count),
            key=lambda item: (-len(item[1]), item[0]),
        )
        kept, dropped = ranked[:size], ranked[size:]
        return {
            "doc_count_error_upper_bound": 0,
            "sum_other_doc_count": sum(len(members) for _, members in dropped),
            "buckets": [
                {"key": k, "doc_count": len(members), **_run_subs(subs, members)} for k, members in kept
            ],
        }

    return aggregate


def _sum(params: Any) -> Aggregator:
    name = _fields(params, "sum", {"field"})["field"]

    def aggregate(docs: list[Mapping[str, Any]]) -> dict[str, Any]:
        # Elasticsearch's CompensatedSum (Kahan summation) over the doubles of the doc values
        total, compensation = 0.0, 0.0
        for doc in docs:
            for v in values_of(doc, name):
                corrected = number(v, name) - compensation
                updated = total + corrected
                compensation = (updated - total) - corrected
                total = updated
        return {"value": total}

    return aggregate

"""The APM agent's JSON serializer, by orjson: the agent's encoding rules, a twentieth of its CPU.

Selected with the agent's documented ``transport_json_serializer`` setting (template.yaml:
``ELASTIC_APM_TRANSPORT_JSON_SERIALIZER: billing.apm_json.dumps``; the local runner's APM_SETTINGS).
elasticapm 6.26 serializes every event with the standard library's ``json`` and a Python
``default`` hook (``elasticapm.utils.json_encoder.dumps``): about 5 % of a bill's event-loop CPU with
a transaction and six spans per customer (bench/profile.py), ~10 µs a span here, 0.6 µs with orjson.

What the agent's encoder does for types JSON lacks is kept (``BetterJSONEncoder.ENCODERS``): sets
as lists, naive datetimes as ``%Y-%m-%dT%H:%M:%S.%fZ``, bytes decoded as UTF-8 with replacement,
Decimals as floats, anything else as ``str()``; dict keys that are not strings as strings. Two
differences, both toward valid JSON: a ``UUID`` is written in its canonical hyphenated form (orjson's
own; the agent writes 32 hex digits; the agent's own ids are strings and never reach this), and a
float NaN or infinity is ``null`` (the standard library writes ``NaN``, which the APM Server's JSON
parser refuses). An integer beyond 64 bits, which orjson refuses, goes through the agent's encoder.
"""

from __future__ import annotations

import datetime
import decimal
from typing import Any

import orjson
from elasticapm.utils import json_encoder

# datetimes through _default, in the agent's format; str, int, dict and list subclasses (str enums
# included) are written natively, as the standard library writes them
_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME


def _default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if isinstance(obj, datetime.datetime):
        return obj.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    if isinstance(obj, decimal.Decimal):
        return float(obj)
    if isinstance(obj, tuple):  # a named tuple: an array, as the standard library writes it
        return list(obj)
    return str(obj)


def dumps(value: Any, **_kwargs: Any) -> str:
    """``value`` as JSON text, as the agent's ``json_encoder.dumps`` writes it (see the module's notes)."""
    try:
        return orjson.dumps(value, default=_default, option=_OPTIONS).decode("utf-8")
    except orjson.JSONEncodeError:
        return str(json_encoder.dumps(value))

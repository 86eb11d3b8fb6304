"""Validate request and response bodies against the copied API descriptions (tests/fixtures/specs).

Google's discovery document names schemas bare (``"$ref": "Operation"``) and uses its own formats
(``google-datetime``, ``int64`` as a JSON string, ``"type": "any"``); Microsoft's OpenAPI 3.0 file uses
``#/components/schemas/...``. Both become JSON Schema here, validated with jsonschema. Objects are
closed (``additionalProperties: false``): Google rejects unknown field names, and a misspelt field is a bug
either way.
The specs leave some rules to the documentation; ``documented_*`` add those.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator, FormatChecker, ValidationError

SPECS = Path(__file__).resolve().parents[1] / "fixtures" / "specs"
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")

FORMATS = FormatChecker()


@FORMATS.checks("google-datetime")
@FORMATS.checks("date-time")
def _is_rfc3339(value: object) -> bool:
    return not isinstance(value, str) or bool(_RFC3339.fullmatch(value))


@FORMATS.checks("uuid", raises=ValueError)
def _is_uuid(value: object) -> bool:
    return not isinstance(value, str) or bool(uuid.UUID(value))


def _load(name: str) -> dict[str, Any]:
    return json.loads((SPECS / name).read_text(encoding="utf-8"))


def _close(schema: Any, ref: Any) -> Any:
    """Recursively rewrite ``schema``: refs through ``ref``, closed objects, int64 strings as digits."""
    if isinstance(schema, list):
        return [_close(s, ref) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        return {"$ref": ref(schema["$ref"])}
    out = {k: _close(v, ref) for k, v in schema.items() if k not in ("enumDescriptions",)}
    if out.get("type") == "any":
        del out["type"]
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if out.get("type") == "string" and out.get("format") in ("int64", "uint64"):
        out["pattern"] = r"^-?\d+$"
    if "properties" in out:
        out["properties"] = {k: _close(v, ref) for k, v in schema["properties"].items()}
    return out


@functools.cache
def _gcp_definitions() -> dict[str, Any]:
    doc = _load("gcp-servicecontrol-v1.json")
    return {name: _close(s, lambda r: f"#/definitions/{r}") for name, s in doc["schemas"].items()}


@functools.cache
def _azure_components() -> dict[str, Any]:
    doc = _load("azure-marketplace-metering.json")
    return {"schemas": {n: _close(s, lambda r: r) for n, s in doc["components"]["schemas"].items()}}


def gcp_method(name: str) -> dict[str, Any]:
    """The discovery document's description of ``services.<name>`` (path, HTTP method, request, response)."""
    method: dict[str, Any] = _load("gcp-servicecontrol-v1.json")["resources"]["services"]["methods"][name]
    return method


def azure_operation(path: str) -> dict[str, Any]:
    """The OpenAPI description of ``POST <path>``, with the server's base path."""
    doc = _load("azure-marketplace-metering.json")
    operation: dict[str, Any] = doc["paths"][path]["post"]
    return operation | {"server": doc["servers"][0]["url"]}


def azure_api_versions() -> list[str]:
    schemas = _load("azure-marketplace-metering.json")["components"]["schemas"]
    versions: list[str] = schemas["ApiVersion"]["enum"]
    return versions


def validate_gcp(schema: str, body: Any) -> None:
    """Raise jsonschema.ValidationError unless ``body`` is a valid ``schema`` of the discovery document."""
    validator = Draft7Validator(
        {"$ref": f"#/definitions/{schema}", "definitions": _gcp_definitions()}, format_checker=FORMATS
    )
    validator.validate(body)


def validate_azure(schema: str, body: Any) -> None:
    """Raise jsonschema.ValidationError unless ``body`` is a valid ``schema`` of the OpenAPI description."""
    validator = Draft7Validator(
        {"$ref": f"#/components/schemas/{schema}", "components": _azure_components()}, format_checker=FORMATS
    )
    validator.validate(body)


def documented_gcp_report(body: dict[str, Any]) -> None:
    """Google's rules for a report the discovery document leaves to prose: the times and ids are required."""
    for operation in body["operations"]:
        for name in ("operationId", "consumerId", "startTime", "endTime", "metricValueSets"):
            if name not in operation:
                raise ValidationError(f"Operation.{name} is required in a report")
        uuid.UUID(operation["operationId"])


def documented_azure_event(event: dict[str, Any]) -> None:
    """Microsoft's rules for a usage event the OpenAPI file leaves to prose."""
    for name in ("quantity", "dimension", "effectiveStartTime", "planId"):
        if name not in event:
            raise ValidationError(f"UsageEvent.{name} is required")
    if ("resourceId" in event) == ("resourceUri" in event):
        raise ValidationError("use resourceId or resourceUri, never both")
    if not event["quantity"] > 0:
        raise ValidationError("quantity must be greater than 0")

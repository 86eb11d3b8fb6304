"""Every sample in events/, invoked through `billing invoke` on the embedded local stack, as a newcomer
would run it: the function each belongs to is the one events/README.md names, and the answer is the one
it documents (the function ran, no error document; the samples documented as refused get the function's
401/403 answer and the one-line reason on stderr).

Each runs the installed `billing` in a fresh process, as from a shell (one APM agent per process: in the
pytest process the tests' agent would hide what the command itself sets up, see
test_invoke_fresh_process), with no database configured, so each starts its own embedded stack
(PostgreSQL, moto, the emulators).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from billing_local.cli_invoke import Function

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "events"
BILLING = str(Path(sys.executable).parent / "billing")
# what a newcomer's shell does not set: the tests' database and agent configuration
_NOT_INHERITED = {
    "DATABASE_URL",
    "BILLING_DATABASE_URL",
    "BILLING_DATABASE_SECRET_ARN",
    "ELASTIC_APM_ENABLED",
    "ELASTIC_APM_TRANSPORT_CLASS",
}


def documented() -> dict[str, tuple[Function, str]]:
    """events/README.md's table: file name pattern -> (function, what invoke answers)."""
    rows: dict[str, tuple[Function, str]] = {}
    for line in (EVENTS / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[1] not in {f.value for f in Function}:
            continue
        for pattern in re.findall(r"`([^`]+\.json)`", cells[0]):
            rows[pattern] = (Function(cells[1]), cells[3])
    return rows


def entry(sample: str) -> tuple[Function, str]:
    matches = [row for pattern, row in documented().items() if fnmatch.fnmatch(sample, pattern)]
    assert len(matches) == 1, f"events/README.md names {sample} in {len(matches)} rows, not 1"
    return matches[0]


SAMPLES = sorted(p.name for p in EVENTS.glob("*.json"))


def test_the_readme_names_every_sample_once() -> None:
    assert len(SAMPLES) >= 26
    for sample in SAMPLES:
        entry(sample)


@pytest.mark.parametrize("sample", SAMPLES)
def test_every_sample_runs_as_its_readme_says(sample: str) -> None:
    function, answer = entry(sample)
    # When a newcomer invokes the sample with the function events/README.md names
    result = subprocess.run(
        [BILLING, "invoke", function.value, "--event", str(EVENTS / sample), "--customers", "6"],
        env={k: v for k, v in os.environ.items() if k not in _NOT_INHERITED},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    # Then the function ran: exit 0, its own response on stdout, no error document or traceback
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    response: Any = json.loads(result.stdout)
    assert "errorType" not in response, response
    refused = re.search(r"refused, (\d{3})", answer)
    status = response.get("statusCode") if isinstance(response, dict) else None
    if refused:
        # documented as refused: the function's answer, and one line on stderr saying why
        assert status == int(refused.group(1)), response
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("refused (")]
        assert line.startswith(f"refused ({status}): ") and "events/README.md" in line
        return
    assert "refused (" not in result.stderr
    assert status in (None, 200), response
    if function is Function.SUBSCRIPTIONS and "batchItemFailures" in response:
        assert response == {"batchItemFailures": []}
    elif function is Function.SUBSCRIPTIONS:
        body = json.loads(response["body"]) if status == 200 else response
        assert body["recorded"] == 1, response


HTTP_SAMPLES = [
    s for s in SAMPLES if "http" in (json.loads((EVENTS / s).read_text()).get("requestContext") or {})
]


def _payload_v2_problems(event: dict[str, Any]) -> list[str]:
    """What Powertools' (AWS's) model of an API Gateway HTTP API payload 2.0 event finds missing or wrong."""
    from aws_lambda_powertools.utilities.parser.models import APIGatewayProxyEventV2Model
    from pydantic import ValidationError

    try:
        APIGatewayProxyEventV2Model.model_validate(event)
    except ValidationError as exc:
        return [".".join(str(p) for p in e["loc"]) for e in exc.errors()]
    return []


@pytest.mark.parametrize("sample", HTTP_SAMPLES)
def test_every_http_sample_is_a_whole_payload_2_0_event(sample: str) -> None:
    # API Gateway always sends requestContext.accountId (the APM agent's capture_serverless reads it)
    # and domainPrefix (API Gateway Developer Guide, "HTTP API Lambda integrations", payload 2.0)
    assert _payload_v2_problems(json.loads((EVENTS / sample).read_text())) == []


def test_the_emulators_build_whole_payload_2_0_events() -> None:
    from billing_local.emulators.aws_events import registration_request
    from billing_local.emulators.azure_fulfillment import landing_page_event
    from billing_local.emulators.gcp_procurement import http_api_event

    assert len(HTTP_SAMPLES) == 9
    for event in (
        registration_request("token", "tenant-1"),
        landing_page_event("token", "tenant-1"),
        http_api_event({"message": {}}, "Bearer x"),
    ):
        assert _payload_v2_problems(event) == []

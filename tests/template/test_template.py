"""The values inside template.yaml that `sam validate --lint` and cfn-lint let through.

Each check returns a list of problems. Every check runs once on the real template (no problems) and
once on a mutated copy (the problem is reported), so no check can pass vacuously.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from billing_local.template import (
    BILLER,
    DISPATCHER,
    StackDefaults,
    Template,
    function_property,
    resolve,
    resource,
)

# --- EventBridge Scheduler cron: minutes hours day-of-month month day-of-week year ----------------

_MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_WEEKDAY_NAMES = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_MONTHS = {name: n for n, name in enumerate(_MONTH_NAMES, 1)}
_WEEKDAYS = {name: n for n, name in enumerate(_WEEKDAY_NAMES, 1)}


@dataclass(frozen=True)
class CronField:
    name: str
    low: int
    high: int
    names: Mapping[str, int] = field(default_factory=dict)


CRON_FIELDS = (
    CronField("minutes", 0, 59),
    CronField("hours", 0, 23),
    CronField("day-of-month", 1, 31),
    CronField("month", 1, 12, _MONTHS),
    CronField("day-of-week", 1, 7, _WEEKDAYS),
    CronField("year", 1970, 2199),
)


def _cron_value(token: str, cron_field: CronField) -> int | None:
    value = int(token) if token.isdigit() else cron_field.names.get(token.upper())
    return value if value is not None and cron_field.low <= value <= cron_field.high else None


def _cron_item_ok(item: str, cron_field: CronField) -> bool:
    if item == "*":
        return True
    if cron_field.name == "day-of-month":
        if item == "L":
            return True
        if item.endswith("W"):  # nearest weekday to day n
            return _cron_value(item[:-1], cron_field) is not None
    if cron_field.name == "day-of-week":
        if item == "L":
            return True
        if "#" in item:  # n-th weekday of the month
            day, _, nth = item.partition("#")
            return _cron_value(day, cron_field) is not None and nth in {"1", "2", "3", "4", "5"}
        if item.endswith("L"):  # last weekday n of the month
            return _cron_value(item[:-1], cron_field) is not None
    base, slash, step = item.partition("/")
    if slash and not (step.isdigit() and int(step) >= 1):
        return False
    if base == "*":
        return bool(slash)
    low, dash, high = base.partition("-")
    if dash:
        return _cron_value(low, cron_field) is not None and _cron_value(high, cron_field) is not None
    return _cron_value(base, cron_field) is not None


def cron_problems(expression: str) -> list[str]:
    """Problems with an EventBridge 6-field cron expression; empty when it is valid."""
    match = re.fullmatch(r"cron\((.*)\)", expression.strip())
    if match is None:
        return [f"{expression!r} is not cron(...)"]
    parts = match.group(1).split()
    if len(parts) != len(CRON_FIELDS):
        return [f"{expression!r} has {len(parts)} fields, EventBridge cron needs 6"]
    problems = []
    for cron_field, part in zip(CRON_FIELDS, parts, strict=True):
        question_ok = part == "?" and cron_field.name in {"day-of-month", "day-of-week"}
        if not question_ok and not all(_cron_item_ok(item, cron_field) for item in part.split(",")):
            problems.append(f"{cron_field.name} {part!r} is invalid in {expression!r}")
    if (parts[2] == "?") == (parts[4] == "?"):
        problems.append(f"exactly one of day-of-month and day-of-week must be '?' in {expression!r}")
    return problems


# --- helpers over the parsed template ------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _schedule(template: Template) -> dict[str, Any]:
    events = resource(template, DISPATCHER)["Properties"]["Events"]
    schedules = [e["Properties"] for e in events.values() if e.get("Type") == "ScheduleV2"]
    assert len(schedules) == 1, "the Dispatcher needs exactly one ScheduleV2 event"
    properties: dict[str, Any] = schedules[0]
    return properties


def _biller_sqs_event(template: Template) -> dict[str, Any]:
    events = resource(template, BILLER)["Properties"]["Events"]
    (event,) = (e["Properties"] for e in events.values() if e.get("Type") == "SQS")
    properties: dict[str, Any] = event
    return properties


def _functions(template: Template) -> Iterator[str]:
    for logical_id, res in template["Resources"].items():
        if res["Type"] == "AWS::Serverless::Function":
            yield logical_id


def _policy_statements(template: Template) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every inline IAM statement, from SAM Policies and from plain IAM resources.

    Managed policies named by ARN/name and SAM policy templates are AWS's, not ours, and skipped.
    """
    for logical_id, res in template["Resources"].items():
        properties = res.get("Properties", {})
        documents: list[Any] = []
        if res["Type"] == "AWS::Serverless::Function":
            documents = [p for p in _as_list(properties.get("Policies", [])) if "Statement" in p]
        elif res["Type"] == "AWS::IAM::Role":
            documents = [p["PolicyDocument"] for p in properties.get("Policies", [])]
        elif res["Type"] in {"AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"}:
            documents = [properties["PolicyDocument"]]
        for document in documents:
            for statement in _as_list(document["Statement"]):
                yield logical_id, statement


def _environment_blocks(template: Template) -> Iterator[tuple[str, dict[str, Any]]]:
    globals_env = template.get("Globals", {}).get("Function", {}).get("Environment", {})
    yield "Globals", globals_env.get("Variables", {})
    for logical_id in _functions(template):
        env = resource(template, logical_id)["Properties"].get("Environment", {})
        yield logical_id, env.get("Variables", {})


def _refers_to(node: Any, logical_id: str) -> bool:
    return node in ({"Ref": logical_id}, {"Fn::GetAtt": [logical_id, "QueueName"]}) or (
        isinstance(node, dict) and node.get("Fn::GetAtt", [None])[0] == logical_id
    )


# --- checks --------------------------------------------------------------------------------------


def check_schedule_cron(template: Template) -> list[str]:
    expression = resolve(template, _schedule(template)["ScheduleExpression"])
    if not isinstance(expression, str):
        return ["the schedule expression has no default value"]
    return cron_problems(expression)


def check_schedule_is_utc(template: Template) -> list[str]:
    timezone = _schedule(template).get("ScheduleExpressionTimezone")
    return [] if timezone == "UTC" else [f"ScheduleExpressionTimezone is {timezone!r}, not UTC"]


def check_schedule_passes_scheduled_time(template: Template) -> list[str]:
    payload = json.loads(_schedule(template).get("Input", "{}"))
    if payload.get("time") != "<aws.scheduler.scheduled-time>":
        return [f"schedule Input does not carry the scheduled time: {payload!r}"]
    return []


def check_schedule_keeps_failed_deliveries(template: Template) -> list[str]:
    schedule = _schedule(template)
    problems = []
    if "Arn" not in schedule.get("DeadLetterConfig", {}):
        problems.append("the schedule has no DeadLetterConfig queue")
    if not {"MaximumRetryAttempts", "MaximumEventAgeInSeconds"} <= set(schedule.get("RetryPolicy", {})):
        problems.append("the schedule has no explicit RetryPolicy")
    return problems


def check_max_concurrency_range(template: Template) -> list[str]:
    problems = []
    value = StackDefaults.from_template(template).biller_max_concurrency
    if not 2 <= value <= 1000:
        problems.append(f"MaximumConcurrency {value} is outside 2..1000")
    parameter = template["Parameters"]["BillerMaximumConcurrency"]
    if parameter.get("MinValue", 0) < 2 or parameter.get("MaxValue", 10**9) > 1000:
        problems.append("BillerMaximumConcurrency parameter allows values outside 2..1000")
    return problems


def check_max_concurrency_within_reserved(template: Template) -> list[str]:
    d = StackDefaults.from_template(template)
    if d.biller_max_concurrency > d.biller_reserved_concurrency:
        return [
            f"MaximumConcurrency {d.biller_max_concurrency} exceeds reserved concurrency "
            f"{d.biller_reserved_concurrency}: the surplus pollers only produce throttles"
        ]
    return []


def check_samconfig_concurrency(template: Template, samconfig: dict[str, Any]) -> list[str]:
    problems = []
    for env, commands in samconfig.items():
        if not isinstance(commands, dict):  # the top-level `version`
            continue
        overrides = commands.get("deploy", {}).get("parameters", {}).get("parameter_overrides")
        if overrides is None:
            continue
        values = dict(item.split("=", 1) for item in shlex.split(overrides))
        mutated = copy.deepcopy(template)
        for name in ("BillerMaximumConcurrency", "BillerReservedConcurrency"):
            if name in values:
                mutated["Parameters"][name]["Default"] = int(values[name])
        problems += [f"samconfig {env}: {p}" for p in check_max_concurrency_range(mutated)]
        problems += [f"samconfig {env}: {p}" for p in check_max_concurrency_within_reserved(mutated)]
    return problems


def check_visibility_timeout(template: Template) -> list[str]:
    d = StackDefaults.from_template(template)
    if d.queue_visibility_timeout < 6 * d.biller_timeout:
        return [f"VisibilityTimeout {d.queue_visibility_timeout} < 6 x Biller timeout {d.biller_timeout}"]
    return []


def check_max_receive_count(template: Template) -> list[str]:
    count = StackDefaults.from_template(template).max_receive_count
    return [] if count >= 5 else [f"maxReceiveCount {count} < 5"]


def check_batch_size(template: Template) -> list[str]:
    size = StackDefaults.from_template(template).biller_batch_size
    return [] if size == 1 else [f"Biller BatchSize is {size}, not 1"]


def check_partial_batch_response(template: Template) -> list[str]:
    if "ReportBatchItemFailures" in _biller_sqs_event(template).get("FunctionResponseTypes", []):
        return []
    return ["the Biller's SQS event does not report batch item failures"]


def check_runtime(template: Template) -> list[str]:
    problems = []
    for logical_id in _functions(template):
        runtime = function_property(template, logical_id, "Runtime")
        architectures = function_property(template, logical_id, "Architectures")
        if runtime != "python3.13":
            problems.append(f"{logical_id} runtime is {runtime!r}")
        if architectures != ["arm64"]:
            problems.append(f"{logical_id} architectures are {architectures!r}")
    return problems


def check_no_wildcard_actions(template: Template) -> list[str]:
    problems = []
    for logical_id, statement in _policy_statements(template):
        if "NotAction" in statement:
            problems.append(f"{logical_id}: NotAction grants everything else")
        problems += [
            f"{logical_id}: wildcard action {action!r}"
            for action in _as_list(statement.get("Action", []))
            if isinstance(action, str) and "*" in action
        ]
    return problems


def check_wildcard_resource_only_for_metering(template: Template) -> list[str]:
    problems = []
    for logical_id, statement in _policy_statements(template):
        if "NotResource" in statement:
            problems.append(f"{logical_id}: NotResource")
        actions = _as_list(statement.get("Action", []))
        if "*" in _as_list(statement.get("Resource", [])) and actions != ["aws-marketplace:BatchMeterUsage"]:
            problems.append(f"{logical_id}: Resource '*' for {actions!r}")
    return problems


_DSN = re.compile(r"\b(?:postgres(?:ql)?|mysql|mongodb(?:\+srv)?|redis)://", re.IGNORECASE)
_SENSITIVE_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY", re.IGNORECASE)
_SECRET_ARN = re.compile(r"^arn:aws[a-z-]*:secretsmanager:")


def _leaves(node: Any) -> Iterator[tuple[str, str]]:
    """("ref", name) for each !Ref and ("literal", text) for each literal value in an env value."""
    if isinstance(node, dict) and "Ref" in node:
        yield "ref", node["Ref"]
    elif isinstance(node, dict) and "Fn::If" in node:
        for branch in node["Fn::If"][1:]:  # [0] is the condition's name, not a value
            yield from _leaves(branch)
    elif isinstance(node, dict) and "Fn::Sub" in node:
        text = node["Fn::Sub"] if isinstance(node["Fn::Sub"], str) else node["Fn::Sub"][0]
        yield "literal", text
    elif isinstance(node, dict):
        for value in node.values():
            yield from _leaves(value)
    elif isinstance(node, list):
        for item in node:
            yield from _leaves(item)
    else:
        yield "literal", str(node)


def _is_secret_reference(template: Template, kind: str, value: str) -> bool:
    if kind == "literal":
        return bool(_SECRET_ARN.match(value))
    if value == "AWS::NoValue" or (value in template.get("Parameters", {}) and value.endswith("SecretArn")):
        return True
    return bool(template["Resources"].get(value, {}).get("Type") == "AWS::SecretsManager::Secret")


def check_no_plaintext_secrets(template: Template) -> list[str]:
    problems = []
    for where, variables in _environment_blocks(template):
        for key, value in variables.items():
            leaves = list(_leaves(value))
            if any(kind == "literal" and _DSN.search(text) for kind, text in leaves):
                problems.append(f"{where}: {key} holds a connection string")
            if _SENSITIVE_KEY.search(key) and not all(
                _is_secret_reference(template, *leaf) for leaf in leaves
            ):
                problems.append(f"{where}: {key} is not a Secrets Manager ARN or *SecretArn parameter")
    return problems


def check_dlq_retention(template: Template) -> list[str]:
    seconds = StackDefaults.from_template(template).dlq_retention_seconds
    return [] if seconds == 14 * 24 * 3600 else [f"BillingDLQ retention is {seconds} s, not 14 days"]


def check_redrive_allow_policy(template: Template) -> list[str]:
    policy = resource(template, "BillingDLQ")["Properties"].get("RedriveAllowPolicy")
    if policy is None:
        return ["BillingDLQ has no RedriveAllowPolicy"]
    queue_name = resource(template, "BillingQueue")["Properties"]["QueueName"]["Fn::Sub"]
    sources = [arn.get("Fn::Sub", "") for arn in policy.get("sourceQueueArns", []) if isinstance(arn, dict)]
    if policy.get("redrivePermission") != "byQueue" or not any(s.endswith(f":{queue_name}") for s in sources):
        return [f"BillingDLQ's RedriveAllowPolicy does not allow exactly BillingQueue: {policy!r}"]
    return []


EXPECTED_ALARMS = {
    "BillingDLQ not empty": ("AWS/SQS", "ApproximateNumberOfMessagesVisible", "BillingDLQ"),
    "Biller errors": ("AWS/Lambda", "Errors", BILLER),
    "BillingQueue oldest message age": ("AWS/SQS", "ApproximateAgeOfOldestMessage", "BillingQueue"),
    "Dispatcher errors": ("AWS/Lambda", "Errors", DISPATCHER),
    "DispatcherScheduleDLQ not empty": (
        "AWS/SQS",
        "ApproximateNumberOfMessagesVisible",
        "DispatcherScheduleDLQ",
    ),
}


def _alarms(template: Template) -> list[dict[str, Any]]:
    return [r["Properties"] for r in template["Resources"].values() if r["Type"] == "AWS::CloudWatch::Alarm"]


def _alarm_for(template: Template, namespace: str, metric: str, target: str) -> dict[str, Any] | None:
    for alarm in _alarms(template):
        if (alarm.get("Namespace"), alarm.get("MetricName")) == (namespace, metric) and any(
            _refers_to(d.get("Value"), target) for d in alarm.get("Dimensions", [])
        ):
            return alarm
    return None


def check_alarms_exist(template: Template) -> list[str]:
    return [
        f"missing alarm: {name}"
        for name, key in EXPECTED_ALARMS.items()
        if _alarm_for(template, *key) is None
    ]


def check_dlq_alarms_fire_on_first_message(template: Template) -> list[str]:
    problems = []
    for name, key in EXPECTED_ALARMS.items():
        alarm = _alarm_for(template, *key)
        if alarm is None or key[1] != "ApproximateNumberOfMessagesVisible":
            continue
        threshold = float(resolve(template, alarm["Threshold"]))
        operator = alarm["ComparisonOperator"]
        fires = (operator == "GreaterThanThreshold" and threshold < 1) or (
            operator == "GreaterThanOrEqualToThreshold" and threshold <= 1
        )
        if not fires:
            problems.append(f"{name}: {operator} {threshold} misses a single message")
    return problems


def check_alarms_notify_topic(template: Template) -> list[str]:
    expected = {"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}
    return [
        f"alarm {alarm.get('AlarmName')!r} does not notify AlarmTopicArn"
        for alarm in _alarms(template)
        if alarm.get("AlarmActions") != expected
    ]


# --- database connections ---------------------------------------------------------------------

POOL_SIZE = "BILLING_DB_POOL_MAX"


def _function_env(template: Template, logical_id: str, name: str) -> Any:
    """A function's environment variable as deployed with default parameters (its own block wins)."""
    own = resource(template, logical_id)["Properties"].get("Environment", {}).get("Variables", {})
    shared = template.get("Globals", {}).get("Function", {}).get("Environment", {}).get("Variables", {})
    return resolve(template, own[name] if name in own else shared.get(name))


def peak_db_connections(template: Template) -> tuple[int, list[str]]:
    """The most connections the stack's pools can hold at once, and why it cannot tell (if so).

    Each execution environment keeps one pool of BILLING_DB_POOL_MAX connections open while frozen.
    The Biller has at most max(MaximumConcurrency, reserved concurrency) environments (SQS respects the
    first; a manual invoke or redrive is capped by the second); the Dispatcher runs once an hour and
    retries one at a time: one environment unless its reserved concurrency says more.
    """
    d = StackDefaults.from_template(template)
    pools = {
        logical_id: _function_env(template, logical_id, POOL_SIZE) for logical_id in (BILLER, DISPATCHER)
    }
    missing = [
        f"{logical_id} has no {POOL_SIZE}: its pool size is unknown"
        for logical_id, size in pools.items()
        if size is None
    ]
    if missing:
        return 0, missing
    dispatcher_reserved = resolve(
        template, function_property(template, DISPATCHER, "ReservedConcurrentExecutions")
    )
    biller_environments = max(d.biller_max_concurrency, d.biller_reserved_concurrency)
    dispatcher_environments = 1 if dispatcher_reserved is None else int(dispatcher_reserved)
    peak = biller_environments * int(pools[BILLER]) + dispatcher_environments * int(pools[DISPATCHER])
    return peak, []


def check_connection_budget(template: Template) -> list[str]:
    budget = resolve(template, {"Ref": "DbConnectionBudget"})
    if budget is None:
        return ["DbConnectionBudget has no default"]
    peak, problems = peak_db_connections(template)
    if not problems and peak > int(budget):
        problems.append(f"the pools can hold {peak} connections, over DbConnectionBudget {budget}")
    return problems


def check_samconfig_connection_budget(template: Template, samconfig: dict[str, Any]) -> list[str]:
    names = ("BillerMaximumConcurrency", "BillerReservedConcurrency", "DbPoolMax", "DbConnectionBudget")
    problems = []
    for env, commands in samconfig.items():
        if not isinstance(commands, dict):  # the top-level `version`
            continue
        overrides = commands.get("deploy", {}).get("parameters", {}).get("parameter_overrides")
        if overrides is None:
            continue
        values = dict(item.split("=", 1) for item in shlex.split(overrides))
        mutated = copy.deepcopy(template)
        for name in names:
            if name in values:
                mutated["Parameters"][name]["Default"] = int(values[name])
        problems += [f"samconfig {env}: {p}" for p in check_connection_budget(mutated)]
    return problems


# --- the cron validator itself -------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression",
    [
        "cron(5 * * * ? *)",
        "cron(0/15 * * * ? *)",
        "cron(0 12 ? * MON-FRI *)",
        "cron(0 8 1W * ? 2030)",
        "cron(0 0 L * ? *)",
        "cron(0 0 ? * 6#3 *)",
        "cron(0 0 ? * 5L *)",
        "cron(0,30 9-17 ? JAN-MAR,DEC SUN,SAT *)",
    ],
)
def test_cron_validator_accepts_valid_eventbridge_cron(expression: str) -> None:
    assert cron_problems(expression) == []


@pytest.mark.parametrize(
    "expression",
    [
        pytest.param("cron(5 * * * *)", id="five-fields"),
        pytest.param("cron(5 * * * * *)", id="no-question-mark"),
        pytest.param("cron(5 * ? * ? *)", id="two-question-marks"),
        pytest.param("cron(60 * * * ? *)", id="minute-60"),
        pytest.param("cron(5 24 * * ? *)", id="hour-24"),
        pytest.param("cron(5 * 0 * ? *)", id="day-0"),
        pytest.param("cron(5 * ? 13 MON *)", id="month-13"),
        pytest.param("cron(5 * ? * FUNDAY *)", id="bad-weekday"),
        pytest.param("cron(5/0 * * * ? *)", id="step-0"),
        pytest.param("cron(5 * * * ? 1969)", id="year-1969"),
        pytest.param("rate(1 hour)", id="not-cron"),
    ],
)
def test_cron_validator_rejects_invalid_cron(expression: str) -> None:
    assert cron_problems(expression) != []


# --- each check passes on template.yaml ... and catches its mutation ------------------------------


def mutate(template: Template, change: Any) -> Template:
    mutated = copy.deepcopy(template)
    change(mutated)
    return mutated


def _props(template: Template, logical_id: str) -> dict[str, Any]:
    properties: dict[str, Any] = template["Resources"][logical_id]["Properties"]
    return properties


def test_schedule_is_a_valid_six_field_cron(template: Template) -> None:
    assert check_schedule_cron(template) == []


def test_five_field_schedule_cron_is_caught(template: Template) -> None:
    broken = mutate(
        template, lambda t: t["Parameters"]["ScheduleExpression"].update(Default="cron(5 * * * *)")
    )
    assert check_schedule_cron(broken) != []


def test_schedule_runs_in_utc(template: Template) -> None:
    assert check_schedule_is_utc(template) == []


def test_schedule_without_timezone_is_caught(template: Template) -> None:
    broken = mutate(template, lambda t: _schedule(t).pop("ScheduleExpressionTimezone"))
    assert check_schedule_is_utc(broken) != []


def test_schedule_input_carries_the_scheduled_time(template: Template) -> None:
    assert check_schedule_passes_scheduled_time(template) == []


def test_schedule_input_without_scheduled_time_is_caught(template: Template) -> None:
    broken = mutate(template, lambda t: _schedule(t).update(Input='{"source": "aws.scheduler"}'))
    assert check_schedule_passes_scheduled_time(broken) != []


def test_schedule_keeps_undeliverable_events(template: Template) -> None:
    assert check_schedule_keeps_failed_deliveries(template) == []


def test_schedule_without_dead_letter_queue_is_caught(template: Template) -> None:
    broken = mutate(template, lambda t: _schedule(t).pop("DeadLetterConfig"))
    assert check_schedule_keeps_failed_deliveries(broken) != []


def test_biller_max_concurrency_is_between_2_and_1000(template: Template) -> None:
    assert check_max_concurrency_range(template) == []


def test_biller_max_concurrency_of_1_is_caught(template: Template) -> None:
    broken = mutate(template, lambda t: t["Parameters"]["BillerMaximumConcurrency"].update(Default=1))
    assert check_max_concurrency_range(broken) != []


def test_biller_max_concurrency_does_not_exceed_reserved_concurrency(template: Template) -> None:
    assert check_max_concurrency_within_reserved(template) == []


def test_max_concurrency_above_reserved_concurrency_is_caught(template: Template) -> None:
    broken = mutate(template, lambda t: t["Parameters"]["BillerReservedConcurrency"].update(Default=10))
    assert check_max_concurrency_within_reserved(broken) != []


def test_samconfig_stages_keep_max_concurrency_valid(template: Template, samconfig: dict[str, Any]) -> None:
    assert check_samconfig_concurrency(template, samconfig) == []


def test_samconfig_stage_above_reserved_concurrency_is_caught(
    template: Template, samconfig: dict[str, Any]
) -> None:
    broken = copy.deepcopy(samconfig)
    broken["prod"]["deploy"]["parameters"]["parameter_overrides"] = (
        "Stage=prod BillerMaximumConcurrency=80 BillerReservedConcurrency=50"
    )
    assert check_samconfig_concurrency(template, broken) != []


def test_visibility_timeout_is_at_least_six_biller_timeouts(template: Template) -> None:
    assert check_visibility_timeout(template) == []


def test_short_visibility_timeout_is_caught(template: Template) -> None:
    broken = mutate(template, lambda t: _props(t, "BillingQueue").update(VisibilityTimeout=300))
    assert check_visibility_timeout(broken) != []


def test_messages_get_at_least_five_receives_before_the_dlq(template: Template) -> None:
    assert check_max_receive_count(template) == []


def test_low_max_receive_count_is_caught(template: Template) -> None:
    broken = mutate(template, lambda t: _props(t, "BillingQueue")["RedrivePolicy"].update(maxReceiveCount=1))
    assert check_max_receive_count(broken) != []


def test_biller_receives_one_message_per_invocation(template: Template) -> None:
    assert check_batch_size(template) == []


def test_batch_size_above_one_is_caught(template: Template) -> None:
    broken = mutate(template, lambda t: _biller_sqs_event(t).update(BatchSize=10))
    assert check_batch_size(broken) != []


def test_biller_reports_batch_item_failures(template: Template) -> None:
    assert check_partial_batch_response(template) == []


def test_missing_report_batch_item_failures_is_caught(template: Template) -> None:
    broken = mutate(template, lambda t: _biller_sqs_event(t).pop("FunctionResponseTypes"))
    assert check_partial_batch_response(broken) != []


def test_functions_run_python313_on_arm64(template: Template) -> None:
    assert check_runtime(template) == []


@pytest.mark.parametrize(
    ("key", "value"), [("Runtime", "python3.12"), ("Architectures", ["x86_64"])], ids=["runtime", "arch"]
)
def test_other_runtime_or_architecture_is_caught(template: Template, key: str, value: Any) -> None:
    broken = mutate(template, lambda t: _props(t, BILLER).update({key: value}))
    assert check_runtime(broken) != []


def test_no_policy_statement_has_a_wildcard_action(template: Template) -> None:
    assert check_no_wildcard_actions(template) == []


def test_wildcard_action_is_caught(template: Template) -> None:
    statement = {"Effect": "Allow", "Action": "sqs:*", "Resource": {"Fn::GetAtt": ["BillingQueue", "Arn"]}}
    broken = mutate(template, lambda t: _props(t, DISPATCHER)["Policies"][0]["Statement"].append(statement))
    assert check_no_wildcard_actions(broken) != []


def test_only_batch_meter_usage_has_resource_star(template: Template) -> None:
    assert check_wildcard_resource_only_for_metering(template) == []


def test_resource_star_on_another_action_is_caught(template: Template) -> None:
    broken = mutate(
        template, lambda t: _props(t, DISPATCHER)["Policies"][0]["Statement"][0].update(Resource="*")
    )
    assert check_wildcard_resource_only_for_metering(broken) != []


def test_environment_holds_no_plaintext_secret(template: Template) -> None:
    assert check_no_plaintext_secrets(template) == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DATABASE_URL", "postgresql://billing:hunter2@db.internal:5432/billing"),
        ("BILLING_ES_API_KEY", "VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw=="),
        ("ELASTIC_APM_SECRET_TOKEN", {"Ref": "ApmServerUrl"}),
        ("BILLING_DB_PASSWORD", "{{resolve:secretsmanager:billing/db:SecretString:password}}"),
    ],
    ids=["dsn", "literal-api-key", "ref-to-non-secret-parameter", "dynamic-reference"],
)
def test_plaintext_secret_in_environment_is_caught(template: Template, key: str, value: Any) -> None:
    broken = mutate(
        template, lambda t: t["Globals"]["Function"]["Environment"]["Variables"].update({key: value})
    )
    assert check_no_plaintext_secrets(broken) != []


def test_billing_dlq_keeps_messages_14_days(template: Template) -> None:
    assert check_dlq_retention(template) == []


def test_short_dlq_retention_is_caught(template: Template) -> None:
    broken = mutate(template, lambda t: _props(t, "BillingDLQ").update(MessageRetentionPeriod=345600))
    assert check_dlq_retention(broken) != []


def test_billing_dlq_allows_redrive_from_billing_queue(template: Template) -> None:
    assert check_redrive_allow_policy(template) == []


def test_missing_redrive_allow_policy_is_caught(template: Template) -> None:
    broken = mutate(template, lambda t: _props(t, "BillingDLQ").pop("RedriveAllowPolicy"))
    assert check_redrive_allow_policy(broken) != []


def test_every_expected_alarm_exists(template: Template) -> None:
    assert check_alarms_exist(template) == []


@pytest.mark.parametrize("name", list(EXPECTED_ALARMS))
def test_missing_alarm_is_caught(template: Template, name: str) -> None:
    namespace, metric, target = EXPECTED_ALARMS[name]

    def drop_alarm(t: Template) -> None:
        t["Resources"] = {
            logical_id: res
            for logical_id, res in t["Resources"].items()
            if res.get("Properties") is not _alarm_for(t, namespace, metric, target)
        }

    assert check_alarms_exist(mutate(template, drop_alarm)) == [f"missing alarm: {name}"]


def test_dlq_alarms_fire_on_the_first_message(template: Template) -> None:
    assert check_dlq_alarms_fire_on_first_message(template) == []


def test_dlq_alarm_that_waits_for_several_messages_is_caught(template: Template) -> None:
    broken = mutate(template, lambda t: _props(t, "BillingDLQNotEmptyAlarm").update(Threshold=5))
    assert check_dlq_alarms_fire_on_first_message(broken) != []


def test_every_alarm_notifies_the_alarm_topic(template: Template) -> None:
    assert check_alarms_notify_topic(template) == []


def test_alarm_without_actions_is_caught(template: Template) -> None:
    broken = mutate(template, lambda t: _props(t, "BillerErrorsAlarm").pop("AlarmActions"))
    assert check_alarms_notify_topic(broken) != []


def test_peak_database_connections_fit_the_budget(template: Template) -> None:
    assert check_connection_budget(template) == []


def test_a_budget_exactly_at_the_peak_is_enough(template: Template) -> None:
    peak, _ = peak_db_connections(template)
    exact = mutate(template, lambda t: t["Parameters"]["DbConnectionBudget"].update(Default=peak))
    assert check_connection_budget(exact) == []


@pytest.mark.parametrize(
    ("parameter", "value"),
    [("DbConnectionBudget", 101), ("DbPoolMax", 3), ("BillerReservedConcurrency", 60)],
    ids=["budget-one-short", "bigger-pools", "more-biller-environments"],
)
def test_pools_over_the_budget_are_caught(template: Template, parameter: str, value: int) -> None:
    broken = mutate(template, lambda t: t["Parameters"][parameter].update(Default=value))
    assert check_connection_budget(broken) != []


def test_the_dispatchers_own_pool_counts_against_the_budget(template: Template) -> None:
    def dispatcher_pool_of_30(t: Template) -> None:
        _props(t, DISPATCHER)["Environment"]["Variables"][POOL_SIZE] = 30

    assert check_connection_budget(mutate(template, dispatcher_pool_of_30)) != []


def test_samconfig_stages_fit_the_connection_budget(template: Template, samconfig: dict[str, Any]) -> None:
    assert check_samconfig_connection_budget(template, samconfig) == []


def test_samconfig_stage_over_the_connection_budget_is_caught(
    template: Template, samconfig: dict[str, Any]
) -> None:
    broken = copy.deepcopy(samconfig)
    broken["prod"]["deploy"]["parameters"]["parameter_overrides"] += " DbPoolMax=5 DbConnectionBudget=200"
    assert check_samconfig_connection_budget(template, broken) != []

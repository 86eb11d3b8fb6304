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
from datetime import timedelta
from typing import Any

import pytest
from policies import each, iam_statements, star_resource_problems, wildcard_action_problems

from billing.adapters import aws_metering, azure_metering, gcp_service_control
from billing.domain.model import HOUR
from billing.entrypoints import biller as biller_entrypoint
from billing_local.template import (
    BILLER,
    DISPATCHER,
    StackDefaults,
    Template,
    condition_is_true,
    function_property,
    resolve,
    resource,
)

AUDITOR = "AuditorFunction"

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


def _schedule(template: Template, logical_id: str = DISPATCHER) -> dict[str, Any]:
    events = resource(template, logical_id)["Properties"]["Events"]
    schedules = [e["Properties"] for e in events.values() if e.get("Type") == "ScheduleV2"]
    assert len(schedules) == 1, f"{logical_id} needs exactly one ScheduleV2 event"
    properties: dict[str, Any] = schedules[0]
    return properties


def _biller_sqs_events(template: Template) -> list[dict[str, Any]]:
    events = resource(template, BILLER)["Properties"]["Events"]
    return [e["Properties"] for e in events.values() if e.get("Type") == "SQS"]


LANE_QUEUES = ("AwsBillingQueue", "GcpBillingQueue", "AzureBillingQueue")
LANE_DLQS = ("AwsBillingDLQ", "GcpBillingDLQ", "AzureBillingDLQ")
LANE_CONCURRENCY = ("AwsLaneMaximumConcurrency", "GcpLaneMaximumConcurrency", "AzureLaneMaximumConcurrency")
CONCURRENCY_PARAMETERS = (*LANE_CONCURRENCY, "BillerReservedConcurrency")
# Each lane's documented quota (the parameters' defaults): AWS Marketplace Metering Service quotas
# (BatchMeterUsage, 10 a second per account and region); Service Infrastructure quotas (Service Control,
# 6,000,000 units a minute per producer project); Azure documents none (0: unpaced, 429 + Retry-After).
DOCUMENTED_QUOTAS = {
    "aws": ("AwsMeteringQuotaPerSecond", 10.0),
    "gcp": ("GcpServiceControlQuotaPerSecond", 100_000.0),
    "azure": ("AzureMeteringQuotaPerSecond", 0.0),
}


def _functions(template: Template) -> Iterator[str]:
    for logical_id, res in template["Resources"].items():
        if res["Type"] == "AWS::Serverless::Function":
            yield logical_id


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
    problems = []
    for logical_id in (DISPATCHER, AUDITOR):
        expression = resolve(template, _schedule(template, logical_id)["ScheduleExpression"])
        if not isinstance(expression, str):
            problems.append(f"{logical_id}: the schedule expression has no default value")
        else:
            problems += [f"{logical_id}: {p}" for p in cron_problems(expression)]
    return problems


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
    for lane in StackDefaults.from_template(template).lanes:
        if not 2 <= lane.max_concurrency <= 1000:
            problems.append(
                f"the {lane.marketplace} lane's MaximumConcurrency {lane.max_concurrency} is outside 2..1000"
            )
    for name in LANE_CONCURRENCY:
        parameter = template["Parameters"][name]
        if parameter.get("MinValue", 0) < 2 or parameter.get("MaxValue", 10**9) > 1000:
            problems.append(f"{name} parameter allows values outside 2..1000")
    return problems


def check_max_concurrency_within_reserved(template: Template) -> list[str]:
    d = StackDefaults.from_template(template)
    if d.biller_max_concurrency > d.biller_reserved_concurrency:
        return [
            f"the lanes' MaximumConcurrency sums to {d.biller_max_concurrency}, over the reserved "
            f"concurrency {d.biller_reserved_concurrency}: one lane's pollers would take another's "
            "environments (throttles)"
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
        for name in CONCURRENCY_PARAMETERS:
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
    return [
        f"the Biller's SQS event on {_get_att(e['Queue'])} does not report batch item failures"
        for e in _biller_sqs_events(template)
        if "ReportBatchItemFailures" not in e.get("FunctionResponseTypes", [])
    ]


def _get_att(node: Any) -> str:
    return str(node["Fn::GetAtt"][0]) if isinstance(node, dict) and "Fn::GetAtt" in node else str(node)


def check_lanes(template: Template) -> list[str]:
    """One lane per marketplace: its own queue, DLQ, event source mapping, alarms and quota parameter."""
    problems = []
    try:
        d = StackDefaults.from_template(template)
    except ValueError as exc:
        return [str(exc)]
    if {lane.marketplace for lane in d.lanes} != set(DOCUMENTED_QUOTAS):
        problems.append(f"lanes {[lane.marketplace for lane in d.lanes]}: one per marketplace expected")
    if len({lane.queue for lane in d.lanes}) != len(d.lanes) or len({lane.dlq for lane in d.lanes}) != len(
        d.lanes
    ):
        problems.append(
            "two lanes share a queue or a dead-letter queue: one would hold the other's customers"
        )
    if len(_biller_sqs_events(template)) != len(d.lanes):
        problems.append("the Biller's SQS event sources are not exactly one per lane")
    biller_env = resource(template, BILLER)["Properties"]["Environment"]["Variables"]
    dispatcher_env = resource(template, DISPATCHER)["Properties"]["Environment"]["Variables"]
    for lane in d.lanes:
        key = f"BILLING_{lane.marketplace.upper()}_QUEUE_URL"
        if dispatcher_env.get(key) != {"Ref": lane.queue}:
            problems.append(f"the Dispatcher does not route {lane.marketplace} customers to {lane.queue}")
        for alarm in (
            ("AWS/SQS", "ApproximateNumberOfMessagesVisible", lane.dlq),
            ("AWS/SQS", "ApproximateAgeOfOldestMessage", lane.queue),
        ):
            if _alarm_for(template, *alarm) is None:
                problems.append(f"the {lane.marketplace} lane has no {alarm[1]} alarm on {alarm[2]}")
        parameter, documented = DOCUMENTED_QUOTAS[lane.marketplace]
        if biller_env.get(f"BILLING_{lane.marketplace.upper()}_QUOTA_PER_SECOND") != {"Ref": parameter}:
            problems.append(f"the Biller does not get the {lane.marketplace} quota from {parameter}")
        if lane.quota_per_second != documented:
            problems.append(
                f"{parameter} defaults to {lane.quota_per_second}, not the documented {documented}"
            )
        environments = biller_env.get(f"BILLING_{lane.marketplace.upper()}_LANE_ENVIRONMENTS")
        mapping = next(e for e in _biller_sqs_events(template) if _get_att(e["Queue"]) == lane.queue)
        if environments != mapping["ScalingConfig"]["MaximumConcurrency"]:
            problems.append(
                f"the {lane.marketplace} pace is not quota / the lane's MaximumConcurrency: "
                f"BILLING_{lane.marketplace.upper()}_LANE_ENVIRONMENTS is {environments!r}"
            )
    return problems


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


# The raw template's own statements; test_iam.py checks what SAM adds to them.
check_no_wildcard_actions = wildcard_action_problems
check_star_resource_only_where_documented = star_resource_problems


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
    return [
        f"{lane.dlq} retention is {lane.dlq_retention_seconds} s, not 14 days"
        for lane in StackDefaults.from_template(template).lanes
        if lane.dlq_retention_seconds != 14 * 24 * 3600
    ]


def check_redrive_allow_policy(template: Template) -> list[str]:
    problems = []
    for lane in StackDefaults.from_template(template).lanes:
        policy = resource(template, lane.dlq)["Properties"].get("RedriveAllowPolicy")
        if policy is None:
            problems.append(f"{lane.dlq} has no RedriveAllowPolicy")
            continue
        queue_name = resource(template, lane.queue)["Properties"]["QueueName"]["Fn::Sub"]
        sources = [a.get("Fn::Sub", "") for a in policy.get("sourceQueueArns", []) if isinstance(a, dict)]
        if policy.get("redrivePermission") != "byQueue" or not any(
            s.endswith(f":{queue_name}") for s in sources
        ):
            problems.append(
                f"{lane.dlq}'s RedriveAllowPolicy does not allow exactly {lane.queue}: {policy!r}"
            )
    return problems


EXPECTED_ALARMS = {
    **{f"{dlq} not empty": ("AWS/SQS", "ApproximateNumberOfMessagesVisible", dlq) for dlq in LANE_DLQS},
    "Biller errors": ("AWS/Lambda", "Errors", BILLER),
    **{f"{q} oldest message age": ("AWS/SQS", "ApproximateAgeOfOldestMessage", q) for q in LANE_QUEUES},
    "Dispatcher errors": ("AWS/Lambda", "Errors", DISPATCHER),
    # a throttled Biller leaves messages waiting while the marketplace windows close
    "Biller throttles": ("AWS/Lambda", "Throttles", BILLER),
    # a reconcile that crashed emits no ReconcileUnexplained
    "Auditor errors": ("AWS/Lambda", "Errors", AUDITOR),
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


# An operator's topic, as a team would pass it in AlarmTopicArn.
GIVEN_TOPIC = "arn:aws:sns:us-east-1:123456789012:on-call"
_NO_VALUE = object()


def _deployed(template: Template, node: Any) -> Any:
    """A value as deployed with the template's parameter defaults; resources as "resource:<id>"."""
    if isinstance(node, list):
        return [v for v in (_deployed(template, item) for item in node) if v is not _NO_VALUE]
    if isinstance(node, dict) and set(node) == {"Fn::If"}:
        condition, when_true, when_false = node["Fn::If"]
        return _deployed(template, when_true if condition_is_true(template, condition) else when_false)
    if isinstance(node, dict) and set(node) == {"Ref"}:
        name = node["Ref"]
        if name == "AWS::NoValue":
            return _NO_VALUE
        if name in template.get("Parameters", {}):
            return resolve(template, node)
        target = template["Resources"].get(name)
        if target is None or ("Condition" in target and not condition_is_true(template, target["Condition"])):
            return f"absent:{name}"
        return f"resource:{name}"
    if isinstance(node, dict) and not any(key == "Ref" or key.startswith("Fn::") for key in node):
        values = {key: _deployed(template, value) for key, value in node.items()}
        return {key: value for key, value in values.items() if value is not _NO_VALUE}
    return node


def check_alarms_have_actions(template: Template) -> list[str]:
    """Every alarm notifies an SNS topic, with AlarmTopicArn given and without it."""
    problems = []
    for given in (GIVEN_TOPIC, ""):
        deployed = copy.deepcopy(template)
        deployed["Parameters"]["AlarmTopicArn"]["Default"] = given
        for logical_id, res in deployed["Resources"].items():
            if res["Type"] not in {"AWS::CloudWatch::Alarm", "AWS::CloudWatch::CompositeAlarm"}:
                continue
            where = f"{logical_id} (AlarmTopicArn={given!r})"
            properties = res["Properties"]
            actions = _deployed(deployed, properties.get("AlarmActions", []))
            actions = [] if actions is _NO_VALUE else actions
            if properties.get("ActionsEnabled") is False or not actions:
                problems.append(f"{where}: no action")
            for action in actions if isinstance(actions, list) else [actions]:
                topic = str(action).removeprefix("resource:")
                is_topic = deployed["Resources"].get(topic, {}).get("Type") == "AWS::SNS::Topic"
                if action != given and not (str(action).startswith("resource:") and is_topic):
                    problems.append(f"{where}: action {action!r} is not an SNS topic of the stack")
    return problems


def check_alarm_email_subscribes(template: Template) -> list[str]:
    """AlarmEmail, without AlarmTopicArn, subscribes the address to the stack's own alarm topic."""
    deployed = copy.deepcopy(template)
    deployed["Parameters"]["AlarmEmail"]["Default"] = "on-call@example.com"
    for res in deployed["Resources"].values():
        if res["Type"] != "AWS::SNS::Subscription":
            continue
        if "Condition" in res and not condition_is_true(deployed, res["Condition"]):
            continue
        properties = res["Properties"]
        topic = _deployed(deployed, properties.get("TopicArn"))
        alarm_topics = {_deployed(deployed, a) for a in _alarms(deployed)[0].get("AlarmActions", [])}
        if (
            topic in alarm_topics
            and properties.get("Protocol") == "email"
            and _deployed(deployed, properties.get("Endpoint")) == "on-call@example.com"
        ):
            return []
    return ["AlarmEmail subscribes no address to the alarm topic"]


# --- database connections ---------------------------------------------------------------------

POOL_SIZE = "BILLING_DB_POOL_MAX"


def _function_env(template: Template, logical_id: str, name: str) -> Any:
    """A function's environment variable as deployed with default parameters (its own block wins)."""
    own = resource(template, logical_id)["Properties"].get("Environment", {}).get("Variables", {})
    shared = template.get("Globals", {}).get("Function", {}).get("Environment", {}).get("Variables", {})
    return resolve(template, own[name] if name in own else shared.get(name))


def _database_functions(template: Template) -> list[str]:
    """The functions that open a database pool: those given the database secret."""
    shared = template.get("Globals", {}).get("Function", {}).get("Environment", {}).get("Variables", {})
    found = []
    for logical_id in _functions(template):
        own = resource(template, logical_id)["Properties"].get("Environment", {}).get("Variables", {})
        if "BILLING_DATABASE_SECRET_ARN" in {**shared, **own}:
            found.append(logical_id)
    return found


def peak_db_connections(template: Template) -> tuple[int, list[str]]:
    """The most connections the stack's pools can hold at once, and why it cannot tell (if so).

    Each execution environment keeps one pool of BILLING_DB_POOL_MAX connections open while frozen.
    The Biller has at most max(MaximumConcurrency, reserved concurrency) environments (SQS respects the
    first; a manual invoke or redrive is capped by the second). Every other function's environments
    are capped by its reserved concurrency alone (the Dispatcher and the Auditor: 1): without one, a
    retry overlapping a slow run, or an operator's invoke, opens another pool.
    """
    d = StackDefaults.from_template(template)
    problems = []
    peak = 0
    for logical_id in _database_functions(template):
        pool = _function_env(template, logical_id, POOL_SIZE)
        reserved = resolve(template, function_property(template, logical_id, "ReservedConcurrentExecutions"))
        if pool is None:
            problems.append(f"{logical_id} has no {POOL_SIZE}: its pool size is unknown")
            continue
        if logical_id == BILLER:
            environments = max(d.biller_max_concurrency, d.biller_reserved_concurrency)
        elif reserved is None:
            problems.append(f"{logical_id} has no reserved concurrency: its pools are unbounded")
            continue
        else:
            environments = int(reserved)
        peak += environments * int(pool)
    return (0, problems) if problems else (peak, [])


def check_connection_budget(template: Template) -> list[str]:
    budget = resolve(template, {"Ref": "DbConnectionBudget"})
    if budget is None:
        return ["DbConnectionBudget has no default"]
    peak, problems = peak_db_connections(template)
    if not problems and peak > int(budget):
        problems.append(f"the pools can hold {peak} connections, over DbConnectionBudget {budget}")
    return problems


def check_samconfig_connection_budget(template: Template, samconfig: dict[str, Any]) -> list[str]:
    names = (*CONCURRENCY_PARAMETERS, "DbPoolMax", "DbConnectionBudget")
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


@pytest.mark.parametrize("parameter", ["ScheduleExpression", "ReconcileScheduleExpression"])
def test_five_field_schedule_cron_is_caught(template: Template, parameter: str) -> None:
    broken = mutate(template, lambda t: t["Parameters"][parameter].update(Default="cron(5 * * * *)"))
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


@pytest.mark.parametrize("parameter", LANE_CONCURRENCY)
def test_biller_max_concurrency_of_1_is_caught(template: Template, parameter: str) -> None:
    broken = mutate(template, lambda t: t["Parameters"][parameter].update(Default=1))
    assert check_max_concurrency_range(broken) != []


def test_each_marketplace_bills_in_its_own_lane(template: Template) -> None:
    assert check_lanes(template) == []


@pytest.mark.parametrize(
    "change",
    [
        # the former shape: every marketplace's customers in one queue
        lambda t: _biller_sqs_events(t)[1].update(Queue={"Fn::GetAtt": ["AwsBillingQueue", "Arn"]}),
        lambda t: _props(t, "DispatcherFunction")["Environment"]["Variables"].pop("BILLING_GCP_QUEUE_URL"),
        lambda t: t["Resources"].pop("AzureBillingQueueOldestMessageAlarm"),
        lambda t: t["Resources"].pop("GcpBillingDLQNotEmptyAlarm"),
        lambda t: t["Parameters"]["AwsMeteringQuotaPerSecond"].update(Default=50),
        lambda t: _props(t, BILLER)["Environment"]["Variables"].update(
            BILLING_AWS_LANE_ENVIRONMENTS={"Ref": "BillerReservedConcurrency"}
        ),
    ],
    ids=["shared-queue", "unrouted", "no-backlog-alarm", "no-dlq-alarm", "undocumented-quota", "wrong-pace"],
)
def test_a_lane_missing_its_own_part_is_caught(template: Template, change: Any) -> None:
    assert check_lanes(mutate(template, change)) != []


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
        "Stage=prod AwsLaneMaximumConcurrency=20 GcpLaneMaximumConcurrency=20 AzureLaneMaximumConcurrency=20 "
        "BillerReservedConcurrency=50"
    )
    assert check_samconfig_concurrency(template, broken) != []


def test_visibility_timeout_is_at_least_six_biller_timeouts(template: Template) -> None:
    assert check_visibility_timeout(template) == []


@pytest.mark.parametrize("queue", LANE_QUEUES)
def test_short_visibility_timeout_is_caught(template: Template, queue: str) -> None:
    broken = mutate(template, lambda t: _props(t, queue).update(VisibilityTimeout=300))
    assert check_visibility_timeout(broken) != []


def test_messages_get_at_least_five_receives_before_the_dlq(template: Template) -> None:
    assert check_max_receive_count(template) == []


@pytest.mark.parametrize("queue", LANE_QUEUES)
def test_low_max_receive_count_is_caught(template: Template, queue: str) -> None:
    broken = mutate(template, lambda t: _props(t, queue)["RedrivePolicy"].update(maxReceiveCount=1))
    assert check_max_receive_count(broken) != []


def test_biller_receives_one_message_per_invocation(template: Template) -> None:
    assert check_batch_size(template) == []


@pytest.mark.parametrize("lane", range(3))
def test_batch_size_above_one_is_caught(template: Template, lane: int) -> None:
    broken = mutate(template, lambda t: _biller_sqs_events(t)[lane].update(BatchSize=10))
    assert check_batch_size(broken) != []


def test_biller_reports_batch_item_failures(template: Template) -> None:
    assert check_partial_batch_response(template) == []


@pytest.mark.parametrize("lane", range(3))
def test_missing_report_batch_item_failures_is_caught(template: Template, lane: int) -> None:
    broken = mutate(template, lambda t: _biller_sqs_events(t)[lane].pop("FunctionResponseTypes"))
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


def _role_statements(template: Template, role: str) -> list[dict[str, Any]]:
    statements: list[dict[str, Any]] = _props(template, role)["Policies"][0]["PolicyDocument"]["Statement"]
    return statements


def test_wildcard_action_is_caught(template: Template) -> None:
    statement = {"Effect": "Allow", "Action": "sqs:*", "Resource": {"Fn::GetAtt": ["AwsBillingQueue", "Arn"]}}
    broken = mutate(template, lambda t: _role_statements(t, "DispatcherRole").append(statement))
    assert check_no_wildcard_actions(broken) != []


def test_resource_star_only_for_actions_documented_without_resource_types(template: Template) -> None:
    assert check_star_resource_only_where_documented(template) == []


@pytest.mark.parametrize(
    ("where", "change"),
    [
        ("DispatcherRole", lambda t: _role_statements(t, "DispatcherRole")[0].update(Resource="*")),
        # the VPC policy: CreateNetworkInterface has resource types, so "*" is not needed for it
        (
            "VpcNetworkInterfacesPolicy",
            lambda t: _props(t, "VpcNetworkInterfacesPolicy")["PolicyDocument"]["Statement"][1].update(
                Resource="*"
            ),
        ),
        # inside an Fn::If branch: only deployed with a KMS key, checked all the same
        (
            "BillerRole",
            lambda t: next(s for s in _role_statements(t, "BillerRole") if "Fn::If" in s)["Fn::If"][1].update(
                Resource="*"
            ),
        ),
    ],
    ids=["inline", "customer-managed-policy", "conditional-statement"],
)
def test_resource_star_on_another_action_is_caught(template: Template, where: str, change: Any) -> None:
    problems = check_star_resource_only_where_documented(mutate(template, change))
    assert any(where in p for p in problems), problems


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


@pytest.mark.parametrize("dlq", LANE_DLQS)
def test_short_dlq_retention_is_caught(template: Template, dlq: str) -> None:
    broken = mutate(template, lambda t: _props(t, dlq).update(MessageRetentionPeriod=345600))
    assert check_dlq_retention(broken) != []


def test_billing_dlq_allows_redrive_from_billing_queue(template: Template) -> None:
    assert check_redrive_allow_policy(template) == []


@pytest.mark.parametrize("dlq", LANE_DLQS)
def test_missing_redrive_allow_policy_is_caught(template: Template, dlq: str) -> None:
    broken = mutate(template, lambda t: _props(t, dlq).pop("RedriveAllowPolicy"))
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


@pytest.mark.parametrize("dlq", LANE_DLQS)
def test_dlq_alarm_that_waits_for_several_messages_is_caught(template: Template, dlq: str) -> None:
    broken = mutate(template, lambda t: _props(t, f"{dlq}NotEmptyAlarm").update(Threshold=5))
    assert check_dlq_alarms_fire_on_first_message(broken) != []


def test_every_alarm_notifies_a_topic_with_or_without_alarm_topic_arn(template: Template) -> None:
    assert check_alarms_have_actions(template) == []


@pytest.mark.parametrize(
    "change",
    [
        lambda t: _props(t, "BillerErrorsAlarm").pop("AlarmActions"),
        # the template's former shape: with no AlarmTopicArn every alarm went nowhere
        lambda t: _props(t, "RecordsFailedAlarm").update(
            AlarmActions={"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}
        ),
        lambda t: _props(t, "ReconcileUnexplainedAlarm").update(ActionsEnabled=False),
        lambda t: t["Resources"]["AlarmTopic"].update(Condition="HasAlarmTopic"),
    ],
    ids=["no-actions", "only-with-alarm-topic-arn", "actions-disabled", "topic-never-created"],
)
def test_alarm_without_an_action_is_caught(template: Template, change: Any) -> None:
    assert check_alarms_have_actions(mutate(template, change)) != []


def test_alarm_email_subscribes_to_the_alarm_topic(template: Template) -> None:
    assert check_alarm_email_subscribes(template) == []


def test_alarm_email_without_subscription_is_caught(template: Template) -> None:
    broken = mutate(template, lambda t: t["Resources"].pop("AlarmEmailSubscription"))
    assert check_alarm_email_subscribes(broken) != []


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


@pytest.mark.parametrize("function", [DISPATCHER, AUDITOR])
def test_a_database_function_without_reserved_concurrency_is_caught(
    template: Template, function: str
) -> None:
    broken = mutate(template, lambda t: _props(t, function).pop("ReservedConcurrentExecutions"))
    assert check_connection_budget(broken) != []


def check_one_at_a_time(template: Template) -> list[str]:
    """The Dispatcher and the Auditor run one environment at a time: the connection budget counts one
    pool each, and two overlapping dispatches of an hour (a retried schedule meeting a slow run) would
    only race to send the same messages, two audits to report the same day."""
    problems = []
    for function in (DISPATCHER, AUDITOR):
        reserved = resolve(template, function_property(template, function, "ReservedConcurrentExecutions"))
        if reserved is None or int(reserved) != 1:
            problems.append(f"{function}'s ReservedConcurrentExecutions is {reserved}, not 1")
    return problems


def test_the_dispatcher_and_the_auditor_run_one_at_a_time(template: Template) -> None:
    assert check_one_at_a_time(template) == []


@pytest.mark.parametrize("function", [DISPATCHER, AUDITOR])
@pytest.mark.parametrize("reserved", [2, None], ids=["two", "none"])
def test_a_second_dispatcher_or_auditor_environment_is_caught(
    template: Template, function: str, reserved: int | None
) -> None:
    def widened(t: Template) -> None:
        if reserved is None:
            _props(t, function).pop("ReservedConcurrentExecutions")
        else:
            _props(t, function)["ReservedConcurrentExecutions"] = reserved

    assert check_one_at_a_time(mutate(template, widened)) != []


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


# --- production: network, resource policies, money alarms (issue #11) ----------------------------

SUBNET_ID = re.compile(r"subnet-[0-9a-f]{8}(?:[0-9a-f]{9})?")
SECURITY_GROUP_ID = re.compile(r"sg-[0-9a-f]{8}(?:[0-9a-f]{9})?")


def _stage_overrides(samconfig: dict[str, Any]) -> Iterator[tuple[str, dict[str, str]]]:
    """(environment, parameter overrides) for each samconfig environment that deploys."""
    for env, commands in samconfig.items():
        if not isinstance(commands, dict):  # the top-level `version`
            continue
        overrides = commands.get("deploy", {}).get("parameters", {}).get("parameter_overrides")
        if overrides is not None:
            yield env, dict(item.split("=", 1) for item in shlex.split(overrides))


def check_prod_stages_run_in_vpc(template: Template, samconfig: dict[str, Any]) -> list[str]:
    """Every samconfig environment that deploys Stage=prod names its private subnets and groups.

    Ids must have EC2's form (8 or 17 hex digits); two subnets at least, so the functions survive an
    Availability Zone (Lambda's advice for VPC functions).
    """
    problems = []
    for env, values in _stage_overrides(samconfig):
        if values.get("Stage", template["Parameters"]["Stage"].get("Default")) != "prod":
            continue
        subnets = [s for s in values.get("SubnetIds", "").split(",") if s]
        groups = [g for g in values.get("SecurityGroupIds", "").split(",") if g]
        if len(subnets) < 2:
            problems.append(f"samconfig {env}: prod needs two or more SubnetIds, has {subnets!r}")
        if not groups:
            problems.append(f"samconfig {env}: prod has no SecurityGroupIds")
        problems += [
            f"samconfig {env}: {s!r} is not a subnet id" for s in subnets if not SUBNET_ID.fullmatch(s)
        ]
        problems += [
            f"samconfig {env}: {g!r} is not a security group id"
            for g in groups
            if not SECURITY_GROUP_ID.fullmatch(g)
        ]
    return problems


def check_prod_vpc_rule(template: Template) -> list[str]:
    """The template itself refuses a prod deploy without a VPC (a --parameter-overrides on the command
    line replaces samconfig's whole list)."""
    for rule in template.get("Rules", {}).values():
        if rule.get("RuleCondition") != {"Fn::Equals": [{"Ref": "Stage"}, "prod"]}:
            continue
        asserted = json.dumps(rule.get("Assertions", []))
        if all(json.dumps({"Ref": name}) in asserted for name in ("SubnetIds", "SecurityGroupIds")):
            return []
    return ["no rule refuses Stage=prod without SubnetIds and SecurityGroupIds"]


def check_functions_join_the_vpc(template: Template) -> list[str]:
    """With SubnetIds and SecurityGroupIds given, every function runs in them."""
    subnets, groups = ["subnet-0a1b2c3d4e5f60718", "subnet-0a1b2c3d4e5f60719"], ["sg-0a1b2c3d4e5f60710"]
    deployed = copy.deepcopy(template)
    deployed["Parameters"]["SubnetIds"]["Default"] = ",".join(subnets)
    deployed["Parameters"]["SecurityGroupIds"]["Default"] = ",".join(groups)
    problems = []
    for logical_id in _functions(template):
        vpc = _deployed(deployed, function_property(deployed, logical_id, "VpcConfig"))
        if (
            not isinstance(vpc, dict)
            or vpc.get("SubnetIds") != subnets
            or vpc.get("SecurityGroupIds") != groups
        ):
            problems.append(f"{logical_id} does not run in the given subnets and security groups: {vpc!r}")
    return problems


def _queue_policy_statements(template: Template, queue: str) -> list[dict[str, Any]] | None:
    for res in template["Resources"].values():
        if res["Type"] == "AWS::SQS::QueuePolicy" and {"Ref": queue} in res["Properties"].get("Queues", []):
            return list(each(res["Properties"]["PolicyDocument"]["Statement"]))
    return None


def _denies_plain_http(statement: dict[str, Any]) -> bool:
    return (
        statement.get("Effect") == "Deny"
        and statement.get("Principal") in ("*", {"AWS": "*"})
        and "sqs:*" in list(each(statement.get("Action")))
        and statement.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") in ("false", False)
    )


# Services that deliver to a queue on the stack's behalf (#13: the marketplace's SNS topic, an EventBridge
# rule's dead letters), each allowed only for one named source (aws:SourceArn), and only SendMessage.
_DELIVERING_SERVICES = frozenset({"sns.amazonaws.com", "events.amazonaws.com"})


def _scoped_service_delivery(statement: dict[str, Any], principal: Any) -> bool:
    if not (isinstance(principal, dict) and set(principal) == {"Service"}):
        return False
    condition = statement.get("Condition", {})
    scoped = any("aws:SourceArn" in (test or {}) for test in condition.values())
    return (
        principal["Service"] in _DELIVERING_SERVICES
        and scoped
        and statement.get("Action") == "sqs:SendMessage"
    )


def check_queue_policies(template: Template) -> list[str]:
    """Each queue's policy allows only the stack's roles and refuses requests without TLS."""
    problems = []
    for logical_id, res in template["Resources"].items():
        if res["Type"] != "AWS::SQS::Queue":
            continue
        statements = _queue_policy_statements(template, logical_id)
        if statements is None:
            problems.append(f"{logical_id} has no queue policy")
            continue
        if not any(_denies_plain_http(s) for s in statements):
            problems.append(f"{logical_id}'s policy does not deny requests without TLS")
        for statement in statements:
            if statement.get("Effect") != "Allow":
                continue
            principal = statement.get("Principal")
            principals = (
                list(each(principal.get("AWS")))
                if isinstance(principal, dict) and set(principal) == {"AWS"}
                else [principal]
            )
            for node in principals:
                if _scoped_service_delivery(statement, node):
                    continue
                target = node.get("Fn::GetAtt", [None])[0] if isinstance(node, dict) else None
                if template["Resources"].get(target, {}).get("Type") != "AWS::IAM::Role":
                    problems.append(f"{logical_id}'s policy allows {node!r}, not a role of the stack")
    return problems


SOME_KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def _deployed_statements(template: Template, role: str) -> list[dict[str, Any]]:
    statements = []
    for policy in _deployed(template, _props(template, role).get("Policies", [])):
        statements += _deployed(template, policy["PolicyDocument"]["Statement"])
    return statements


def check_secrets_kms_key(template: Template) -> list[str]:
    """With SecretsKmsKeyArn, each role that reads secrets may decrypt with that key, through Secrets
    Manager only; without it, no role holds kms:Decrypt."""
    problems = []
    for key in (SOME_KMS_KEY, ""):
        deployed = copy.deepcopy(template)
        deployed["Parameters"]["SecretsKmsKeyArn"]["Default"] = key
        for logical_id, res in deployed["Resources"].items():
            if res["Type"] != "AWS::IAM::Role":
                continue
            statements = _deployed_statements(deployed, logical_id)
            reads = any("secretsmanager:GetSecretValue" in list(each(s.get("Action"))) for s in statements)
            decrypts = [s for s in statements if "kms:Decrypt" in list(each(s.get("Action")))]
            if not key:
                problems += [f"{logical_id} holds kms:Decrypt with no SecretsKmsKeyArn" for _ in decrypts]
                continue
            scoped = [
                s
                for s in decrypts
                if list(each(s.get("Resource"))) == [key]
                and "kms:ViaService" in s.get("Condition", {}).get("StringEquals", {})
            ]
            if reads and not scoped:
                problems.append(
                    f"{logical_id} reads secrets but cannot decrypt them with SecretsKmsKeyArn alone"
                )
            if len(scoped) != len(decrypts):
                problems.append(f"{logical_id} holds kms:Decrypt beyond SecretsKmsKeyArn via Secrets Manager")
    return problems


# A full ARN ends in the 6 characters Secrets Manager appends to the name; IAM matches a partial ARN
# (without them) to no secret, so GetSecretValue would be denied at the first cold start.
FULL_SECRET_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:billing/db-AbC123"
NOT_FULL_SECRET_ARNS = (
    "arn:aws:secretsmanager:us-east-1:123456789012:secret:billing/db",
    "billing/db",
    "arn:aws:ssm:us-east-1:123456789012:parameter/billing/db-AbC123",
)


def check_secret_arn_parameters(template: Template) -> list[str]:
    problems = []
    for name, parameter in template["Parameters"].items():
        if not name.endswith("SecretArn"):
            continue
        pattern = parameter.get("AllowedPattern")
        if pattern is None:
            problems.append(f"{name} has no AllowedPattern")
            continue
        if not re.fullmatch(pattern, FULL_SECRET_ARN):
            problems.append(f"{name} rejects a full secret ARN")
        problems += [
            f"{name} accepts {value!r}" for value in NOT_FULL_SECRET_ARNS if re.fullmatch(pattern, value)
        ]
        if parameter.get("Default") == "" and not re.fullmatch(pattern, ""):
            problems.append(f"{name} is optional but its pattern rejects the empty default")
    return problems


def check_retained(template: Template) -> list[str]:
    """Queues (unbilled hours) and log groups (the record of what was billed) outlive the stack, and
    every function logs to one of those groups."""
    problems = []
    for logical_id, res in template["Resources"].items():
        if res["Type"] in {"AWS::SQS::Queue", "AWS::Logs::LogGroup"}:
            problems += [
                f"{logical_id}: {policy} is not Retain"
                for policy in ("DeletionPolicy", "UpdateReplacePolicy")
                if res.get(policy) != "Retain"
            ]
    for logical_id in _functions(template):
        group = function_property(template, logical_id, "LoggingConfig") or {}
        target = group.get("LogGroup", {}).get("Ref") if isinstance(group.get("LogGroup"), dict) else None
        if template["Resources"].get(target, {}).get("Type") != "AWS::Logs::LogGroup":
            problems.append(f"{logical_id} does not log to a log group of the stack")
    return problems


_INSIGHTS_QUERY = re.compile(
    r"SELECT\s+(?:SUM|MAX)\((?P<metric>\w+)\)\s+FROM\s+(?P<namespace>[\w/\"]+)"
    r"(?:\s+WHERE\s+service\s*=\s*'(?P<service>[^']+)')?\s*",
    re.IGNORECASE,
)


def _emf_alarms(template: Template, metric: str) -> Iterator[tuple[str, str | None, dict[str, Any]]]:
    """(namespace, service dimension, alarm) for each alarm on an EMF metric of this name."""
    for alarm in _alarms(template):
        if alarm.get("MetricName") == metric:
            services = [d.get("Value") for d in alarm.get("Dimensions", []) if d.get("Name") == "service"]
            yield alarm.get("Namespace", ""), services[0] if services else None, alarm
        for query in alarm.get("Metrics", []):
            match = _INSIGHTS_QUERY.fullmatch(str(query.get("Expression", "")))
            if match and match["metric"] == metric:
                yield match["namespace"].strip('"'), match["service"], alarm


def _fires_above_zero(alarm: dict[str, Any]) -> bool:
    return alarm.get("ComparisonOperator") == "GreaterThanThreshold" and float(alarm.get("Threshold", 1)) < 1


# The Biller's metrics of money not collected, by the names its code emits them under.
MONEY_METRICS = (
    biller_entrypoint._COUNTED[biller_entrypoint.LedgerState.REJECTED],
    biller_entrypoint._COUNTED[biller_entrypoint.LedgerState.FAILED],
    "BillingFailures",
)


def check_money_alarms(template: Template) -> list[str]:
    """An alarm fires on each Biller metric of money not collected, as the Biller emits it: in the
    stack's metrics namespace, with the Biller's service dimension (Powertools adds it)."""
    namespace = _function_env(template, BILLER, "POWERTOOLS_METRICS_NAMESPACE")
    service = _function_env(template, BILLER, "POWERTOOLS_SERVICE_NAME")
    problems = []
    for metric in MONEY_METRICS:
        matching = [a for ns, svc, a in _emf_alarms(template, metric) if (ns, svc) == (namespace, service)]
        if not any(_fires_above_zero(a) for a in matching):
            problems.append(f"no alarm fires on {metric} > 0 in {namespace} for service {service}")
    return problems


def check_reconcile_alarm(template: Template) -> list[str]:
    """The daily reconcile's ReconcileUnexplained > 0 alarms, and so does a day without it."""
    namespace = _function_env(template, AUDITOR, "POWERTOOLS_METRICS_NAMESPACE")
    service = _function_env(template, AUDITOR, "POWERTOOLS_SERVICE_NAME")
    for ns, svc, alarm in _emf_alarms(template, "ReconcileUnexplained"):
        if (ns, svc) != (namespace, service) or not _fires_above_zero(alarm):
            continue
        window = int(alarm.get("Period", 0)) * int(alarm.get("EvaluationPeriods", 0))
        if alarm.get("TreatMissingData") == "breaching" and 0 < window <= 24 * 3600:
            return []
    return [
        f"no alarm on ReconcileUnexplained > 0 ({namespace}, {service}) that also breaches on a missing day"
    ]


# Time left, once the alarm fires, to raise concurrency or redrive before the window closes.
ACTION_MARGIN = timedelta(minutes=10)
TIGHTEST_WINDOW = min(r.window for r in (aws_metering.RULES, gcp_service_control.RULES, azure_metering.RULES))


def check_backlog_alarm_within_window(template: Template) -> list[str]:
    """The oldest-message alarm fires while the tightest marketplace window still leaves time to act.

    Windows run from the hour's start (RULES.window); a message is sent SettleDelayMinutes after the
    hour's end, so it has window - 1 h - settle delay to be billed. The alarm fires at most one
    evaluation (Period x EvaluationPeriods) after the age crosses its threshold, for the default and
    for any value the threshold parameter allows.
    """
    problems = []
    for queue in LANE_QUEUES:
        problems += _lane_backlog_alarm_problems(template, queue)
    return problems


def _lane_backlog_alarm_problems(template: Template, queue: str) -> list[str]:
    alarm = _alarm_for(template, "AWS/SQS", "ApproximateAgeOfOldestMessage", queue)
    if alarm is None:
        return [f"no alarm on {queue}'s oldest message age"]
    settle = timedelta(minutes=int(resolve(template, {"Ref": "SettleDelayMinutes"})))
    budget = TIGHTEST_WINDOW - HOUR - settle - ACTION_MARGIN
    evaluation = timedelta(seconds=int(alarm["Period"]) * int(alarm["EvaluationPeriods"]))
    thresholds = {"default": resolve(template, alarm["Threshold"])}
    if isinstance(alarm["Threshold"], dict) and "Ref" in alarm["Threshold"]:
        thresholds["MaxValue"] = template["Parameters"][alarm["Threshold"]["Ref"]].get("MaxValue")
    problems = []
    for which, threshold in thresholds.items():
        if threshold is None:
            problems.append(
                f"{queue}'s oldest-message alarm's threshold has no {which}: it can exceed the window"
            )
        elif timedelta(seconds=float(threshold)) + evaluation > budget:
            problems.append(
                f"{queue}'s oldest-message alarm ({which} {threshold} s + {evaluation}) fires after the "
                f"{TIGHTEST_WINDOW} window less {settle} settle delay and {ACTION_MARGIN} to act"
            )
    return problems


def check_samconfig_backlog_alarm(template: Template, samconfig: dict[str, Any]) -> list[str]:
    problems = []
    for env, values in _stage_overrides(samconfig):
        mutated = copy.deepcopy(template)
        for name in ("SettleDelayMinutes", "OldestMessageAgeAlarmSeconds"):
            if name in values:
                mutated["Parameters"][name]["Default"] = int(values[name])
        problems += [f"samconfig {env}: {p}" for p in check_backlog_alarm_within_window(mutated)]
    return problems


# What the Auditor's role may do: read the database secret (and decrypt it), write its logs (its
# metrics are EMF lines in them) and, in a VPC, manage its network interfaces.
AUDITOR_ACTIONS = frozenset(
    {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "secretsmanager:GetSecretValue",
        "kms:Decrypt",
        "ec2:CreateNetworkInterface",
        "ec2:DescribeNetworkInterfaces",
        "ec2:DescribeSubnets",
        "ec2:DeleteNetworkInterface",
        "ec2:AssignPrivateIpAddresses",
        "ec2:UnassignPrivateIpAddresses",
    }
)


def check_auditor(template: Template) -> list[str]:
    problems = []
    properties = _props(template, AUDITOR)
    if (properties.get("CodeUri"), properties.get("Handler")) != (
        "functions/auditor/",
        "auditor.lambda_handler",
    ):
        problems.append(f"the Auditor runs {properties.get('CodeUri')!r} {properties.get('Handler')!r}")
    role = properties.get("Role", {}).get("Fn::GetAtt", [None])[0]
    if role is None:
        return [*problems, "the Auditor has no role of its own"]
    granted = {
        action
        for _where, statement in allow_statements_of(template, role)
        for action in each(statement.get("Action"))
    }
    problems += [f"the Auditor's role grants {action}" for action in sorted(granted - AUDITOR_ACTIONS)]
    return problems


def allow_statements_of(template: Template, role: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The Allow statements of one role (inline and managed, both branches of every Fn::If)."""
    for where, statement in iam_statements(template):
        if where.startswith(f"{role} ") and statement.get("Effect") == "Allow":
            yield where, statement


# --- production checks on template.yaml ... and on mutated copies -------------------------------------


def test_prod_stages_run_in_a_vpc(template: Template, samconfig: dict[str, Any]) -> None:
    assert check_prod_stages_run_in_vpc(template, samconfig) == []


@pytest.mark.parametrize(
    "overrides",
    [
        "Stage=prod AwsLaneMaximumConcurrency=10 BillerReservedConcurrency=50",
        "Stage=prod SubnetIds=subnet-0a1b2c3d4e5f60718,subnet-0a1b2c3d4e5f60719",
        "Stage=prod SubnetIds=subnet-REPLACE_ME,subnet-REPLACE_ME_TOO SecurityGroupIds=sg-0a1b2c3d4e5f60710",
        "Stage=prod SubnetIds=subnet-0a1b2c3d4e5f60718 SecurityGroupIds=sg-0a1b2c3d4e5f60710",
    ],
    ids=["no-vpc", "no-security-group", "placeholder-ids", "one-subnet"],
)
def test_prod_stage_without_a_vpc_is_caught(
    template: Template, samconfig: dict[str, Any], overrides: str
) -> None:
    broken = copy.deepcopy(samconfig)
    broken["prod"]["deploy"]["parameters"]["parameter_overrides"] = overrides
    assert check_prod_stages_run_in_vpc(template, broken) != []


def test_template_refuses_prod_without_a_vpc(template: Template) -> None:
    assert check_prod_vpc_rule(template) == []


def test_template_without_the_prod_vpc_rule_is_caught(template: Template) -> None:
    assert check_prod_vpc_rule(mutate(template, lambda t: t.pop("Rules"))) != []


def test_every_function_joins_the_given_vpc(template: Template) -> None:
    assert check_functions_join_the_vpc(template) == []


def test_function_outside_the_vpc_is_caught(template: Template) -> None:
    broken = mutate(template, lambda t: _props(t, AUDITOR).update(VpcConfig={"Ref": "AWS::NoValue"}))
    assert check_functions_join_the_vpc(broken) != []


def test_queue_policies_allow_only_the_stacks_roles_over_tls(template: Template) -> None:
    assert check_queue_policies(template) == []


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t["Resources"].pop("GcpBillingDLQPolicy"),
        lambda t: _props(t, "AzureBillingQueuePolicy")["PolicyDocument"]["Statement"].pop(),
        lambda t: _props(t, "DispatcherScheduleDLQPolicy")["PolicyDocument"]["Statement"][0].update(
            Principal="*"
        ),
        lambda t: _props(t, "AwsBillingQueuePolicy")["PolicyDocument"]["Statement"][0].update(
            Principal={"AWS": {"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:root"}}
        ),
    ],
    ids=["no-policy", "no-tls-deny", "anyone", "whole-account"],
)
def test_open_or_plain_http_queue_is_caught(template: Template, change: Any) -> None:
    assert check_queue_policies(mutate(template, change)) != []


def test_secrets_kms_key_is_decrypted_through_secrets_manager_only(template: Template) -> None:
    assert check_secrets_kms_key(template) == []


@pytest.mark.parametrize(
    "change",
    [
        lambda t: _role_statements(t, "AuditorRole").pop(),
        lambda t: _role_statements(t, "BillerRole")[-1]["Fn::If"][1].pop("Condition"),
        lambda t: _role_statements(t, "DispatcherRole").append(
            {
                "Effect": "Allow",
                "Action": "kms:Decrypt",
                "Resource": {"Fn::Sub": "arn:aws:kms:*:${AWS::AccountId}:key/*"},
            }
        ),
    ],
    ids=["cannot-decrypt", "decrypt-outside-secrets-manager", "any-key"],
)
def test_unscoped_or_missing_kms_decrypt_is_caught(template: Template, change: Any) -> None:
    assert check_secrets_kms_key(mutate(template, change)) != []


def test_secret_arn_parameters_take_full_arns_only(template: Template) -> None:
    assert check_secret_arn_parameters(template) == []


@pytest.mark.parametrize(
    "change",
    [
        # the template's former pattern: a partial ARN passed
        lambda t: t["Parameters"]["DatabaseSecretArn"].update(
            AllowedPattern="^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+$"
        ),
        lambda t: t["Parameters"]["GcpCredentialsSecretArn"].pop("AllowedPattern"),
    ],
    ids=["partial-arn-accepted", "no-pattern"],
)
def test_secret_arn_parameter_accepting_partial_arns_is_caught(template: Template, change: Any) -> None:
    assert check_secret_arn_parameters(mutate(template, change)) != []


def test_queues_and_log_groups_are_retained(template: Template) -> None:
    assert check_retained(template) == []


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t["Resources"]["AzureBillingDLQ"].pop("DeletionPolicy"),
        lambda t: t["Resources"]["AuditorLogGroup"].pop("UpdateReplacePolicy"),
        lambda t: _props(t, AUDITOR).pop("LoggingConfig"),
    ],
    ids=["queue-deleted", "log-group-replaced", "function-logs-elsewhere"],
)
def test_deletable_queue_or_log_group_is_caught(template: Template, change: Any) -> None:
    assert check_retained(mutate(template, change)) != []


def test_money_not_collected_raises_alarms(template: Template) -> None:
    assert check_money_alarms(template) == []


@pytest.mark.parametrize("metric", MONEY_METRICS)
def test_missing_money_alarm_is_caught(template: Template, metric: str) -> None:
    def drop(t: Template) -> None:
        t["Resources"] = {
            k: r
            for k, r in t["Resources"].items()
            if not (r["Type"] == "AWS::CloudWatch::Alarm" and metric in json.dumps(r["Properties"]))
        }

    assert check_money_alarms(mutate(template, drop)) != []


@pytest.mark.parametrize(
    "change",
    [
        lambda t: _props(t, "BillingFailuresAlarm")["Dimensions"][0].update(Value="billing"),
        lambda t: _props(t, "BillingFailuresAlarm").update(Namespace="MarketplaceBilling"),
        lambda t: _props(t, "RecordsRejectedAlarm")["Metrics"][0].update(
            Expression="SELECT SUM(RecordsRejected) FROM Billing WHERE service = 'billing-dispatcher'"
        ),
        lambda t: _props(t, "RecordsFailedAlarm").update(Threshold=5),
    ],
    ids=["wrong-service", "wrong-namespace", "query-on-other-service", "not-above-zero"],
)
def test_money_alarm_on_a_metric_never_emitted_is_caught(template: Template, change: Any) -> None:
    assert check_money_alarms(mutate(template, change)) != []


def test_reconcile_unexplained_or_missing_raises_an_alarm(template: Template) -> None:
    assert check_reconcile_alarm(template) == []


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t["Resources"].pop("ReconcileUnexplainedAlarm"),
        lambda t: _props(t, "ReconcileUnexplainedAlarm").update(TreatMissingData="notBreaching"),
        lambda t: _props(t, AUDITOR)["Environment"]["Variables"].update(POWERTOOLS_SERVICE_NAME="auditor"),
    ],
    ids=["no-alarm", "missing-day-ignored", "service-mismatch"],
)
def test_reconcile_alarm_that_cannot_fire_is_caught(template: Template, change: Any) -> None:
    assert check_reconcile_alarm(mutate(template, change)) != []


def test_backlog_alarm_fires_inside_the_tightest_marketplace_window(template: Template) -> None:
    assert check_backlog_alarm_within_window(template) == []


@pytest.mark.parametrize(
    "change",
    [
        # the template's former parameter: any threshold, a day included, was accepted
        lambda t: t["Parameters"]["OldestMessageAgeAlarmSeconds"].pop("MaxValue"),
        lambda t: t["Parameters"]["SettleDelayMinutes"].update(Default=40),
        lambda t: _props(t, "GcpBillingQueueOldestMessageAlarm").update(EvaluationPeriods=6),
    ],
    ids=["unbounded-threshold", "long-settle-delay", "slow-evaluation"],
)
def test_backlog_alarm_firing_after_the_window_is_caught(template: Template, change: Any) -> None:
    assert check_backlog_alarm_within_window(mutate(template, change)) != []


def test_samconfig_stages_keep_the_backlog_alarm_inside_the_window(
    template: Template, samconfig: dict[str, Any]
) -> None:
    assert check_samconfig_backlog_alarm(template, samconfig) == []


def test_samconfig_stage_with_a_late_backlog_alarm_is_caught(
    template: Template, samconfig: dict[str, Any]
) -> None:
    broken = copy.deepcopy(samconfig)
    broken["prod"]["deploy"]["parameters"]["parameter_overrides"] += " OldestMessageAgeAlarmSeconds=3000"
    assert check_samconfig_backlog_alarm(template, broken) != []


def test_auditor_runs_the_reconcile_with_least_privilege(template: Template) -> None:
    assert check_auditor(template) == []


@pytest.mark.parametrize(
    "change",
    [
        lambda t: _role_statements(t, "AuditorRole").append(
            {
                "Effect": "Allow",
                "Action": "sqs:SendMessage",
                "Resource": {"Fn::GetAtt": ["AwsBillingQueue", "Arn"]},
            }
        ),
        lambda t: _props(t, AUDITOR).update(Role={"Fn::GetAtt": ["BillerRole", "Arn"]}),
        lambda t: _props(t, AUDITOR).update(Handler="auditor.handler"),
    ],
    ids=["extra-action", "biller-role", "wrong-handler"],
)
def test_auditor_with_more_than_it_needs_is_caught(template: Template, change: Any) -> None:
    assert check_auditor(mutate(template, change)) != []


# --- every secret a function's code reads, its role may read ----------------------------------------

# What each function's code opens: every one opens the database (and the APM agent reads its token);
# the Biller and the Auditor read usage (billing.services.bill and billing.services.reconcile both take
# a UsageSource), and only the Biller calls the marketplaces.
SECRETS_READ = {
    "DispatcherFunction": {"DatabaseSecretArn"},
    "BillerFunction": {
        "DatabaseSecretArn",
        "EsApiKeySecretArn",
        "GcpCredentialsSecretArn",
        "AzureCredentialsSecretArn",
    },
    AUDITOR: {"DatabaseSecretArn", "EsApiKeySecretArn"},
}


def _readable_secret_refs(template: Template, function: str) -> set[str]:
    role = _props(template, function)["Role"]["Fn::GetAtt"][0]
    refs: set[str] = set()
    for statement in _role_statements(template, role):
        if not isinstance(statement, dict) or statement.get("Action") != "secretsmanager:GetSecretValue":
            continue
        for arn in statement["Resource"]:
            if isinstance(arn, dict) and "Ref" in arn:
                refs.add(arn["Ref"])
            elif isinstance(arn, dict) and "Fn::If" in arn:
                then = arn["Fn::If"][1]
                if isinstance(then, dict) and "Ref" in then:
                    refs.add(then["Ref"])
    return refs


def check_secrets_readable(template: Template) -> list[str]:
    problems = []
    for function, needed in SECRETS_READ.items():
        missing = (needed | {"ApmSecretArn"}) - _readable_secret_refs(template, function)
        problems += [f"{function} reads {ref} but its role cannot" for ref in sorted(missing)]
    return problems


def test_every_function_role_reads_the_secrets_its_code_reads(template: Template) -> None:
    assert check_secrets_readable(template) == []


def test_a_secret_the_role_cannot_read_is_caught(template: Template) -> None:
    def drop_es_secret(t: Template) -> None:
        for statement in _role_statements(t, "AuditorRole"):
            if statement.get("Action") == "secretsmanager:GetSecretValue":
                kept = [r for r in statement["Resource"] if "EsApiKeySecretArn" not in str(r)]
                statement["Resource"] = kept

    assert check_secrets_readable(mutate(template, drop_es_secret)) == [
        "AuditorFunction reads EsApiKeySecretArn but its role cannot"
    ]

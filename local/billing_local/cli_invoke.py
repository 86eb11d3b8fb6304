"""`billing invoke`: run a function's real handler in this process, the way `sam local invoke` runs it.

``register(app)`` adds the command. The function's Handler, CodeUri, Timeout, MemorySize, Runtime and
Environment come from template.yaml (billing_local.template); an env-vars file in SAM's format overrides
them; the Lambda runtime's own variables are set as SAM sets them; the handler module is imported afresh
(a cold start) and called once with the event and a context object like SAM's. Without a configured
database it runs against the embedded local stack (billing_local.stack), seeded for the event's hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from billing_local.lambda_shapes import (  # SAM puts that account id in AWS_ACCOUNT_ID
    ACCOUNT_ID,
    LambdaContext,
)

if TYPE_CHECKING:
    from billing.domain.model import Period
    from billing_local.stack import LocalStack
    from billing_local.template import FunctionConfig

console = Console(stderr=True, soft_wrap=True)

DEFAULT_REGION = "us-east-1"
APM_CAPTURE_TRANSPORT = "billing_local.apm_capture.CaptureTransport"
APM_TRANSPORT = "ELASTIC_APM_TRANSPORT_CLASS"
APM_ENABLED = "ELASTIC_APM_ENABLED"
# the SQS attributes a sample event carries from when it was written (a year before its hour)
SQS_TIMESTAMPS = ("SentTimestamp", "ApproximateFirstReceiveTimestamp")
# "now" for the emulators and the Biller: 20 minutes after the event's hour ended, inside every
# marketplace's window (the sample events name the fixed hour 2026-11-26T13:00Z)
AFTER_HOUR_END = timedelta(minutes=20)
DATABASE_VARIABLES = ("DATABASE_URL", "BILLING_DATABASE_URL", "BILLING_DATABASE_SECRET_ARN")


class Function(StrEnum):
    """The template's functions, by the name `sam local invoke` also accepts."""

    DISPATCHER = "Dispatcher"
    BILLER = "Biller"
    SUBSCRIPTIONS = "Subscriptions"
    AUDITOR = "Auditor"

    @property
    def logical_id(self) -> str:
        return f"{self.value}Function"


# Paragraphs are single strings: typer keeps a docstring's line breaks, then wraps again.
INVOKE_HELP = "\n\n".join(
    (
        "Run a function's real handler once, in-process, the way `sam local invoke` would.",
        "Handler, CodeUri, Timeout, MemorySize and Environment come from the template. --env-vars overrides"
        ' them as SAM does: its "Parameters" apply to every function and a "BillerFunction" or'
        ' "DispatcherFunction" entry wins over them. AWS_LAMBDA_FUNCTION_NAME, AWS_EXECUTION_ENV,'
        " LAMBDA_TASK_ROOT and the other runtime variables are set as SAM sets them. The handler module is"
        " imported afresh (a cold start) and called with the event and a context like SAM's. Its logs go to"
        " stderr, its JSON response to stdout; the exit code is 1 if the function raised.",
        "Without DATABASE_URL or BILLING_DATABASE_SECRET_ARN (in the environment or --env-vars) it runs"
        " against the embedded local stack: PostgreSQL, migrated and seeded with the --customers demo"
        " customers (cust-000000, cust-000001...) and their usage for the event's hour; moto for SQS; the"
        " marketplace emulators, with every customer subscribed. The sample events name the fixed hour"
        " 2026-11-26T13:00Z, long past the marketplaces' windows, so the emulators' clocks and the Biller's"
        " clock (the imported handler module's runtime is built again with that clock) read 20 minutes"
        " after that hour ended, as if the hour were being billed on time.",
        "Subscriptions: the stack also serves Google's Procurement API and Azure's fulfillment API. An AWS"
        " agreement event names only its agreement, so the store first records the agreement's License"
        " Updated event; an AWS registration's token is taken by the emulator as one it issued (a note"
        " says each). The gcp-* and azure-* samples are signed by a throwaway key: the function answers"
        " 401/403 and one line says why. Auditor: reconciles the event's day on the fresh stack."
        " events/README.md says which function each sample is for and what it answers.",
        "The APM agent gets an in-memory transport (billing_local.apm_capture) unless"
        " ELASTIC_APM_TRANSPORT_CLASS says otherwise, so nothing tries to reach an APM Server; with it the"
        " agent is on (unless ELASTIC_APM_ENABLED is set in the environment or --env-vars), so the"
        " handler's log lines carry its transaction's trace.id and transaction.id.",
        "The SQS records' SentTimestamp and ApproximateFirstReceiveTimestamp are set to the invocation"
        " time, as for a message delivered now (the sample files' own are a year old, and the Biller's"
        " MessageAgeMs metric would report that); --keep-timestamps keeps them.",
    )
)


def register(app: typer.Typer) -> None:
    """Add `invoke` to the app."""
    app.command("invoke", help=INVOKE_HELP)(invoke_command)


def invoke_command(
    function: Annotated[
        Function, typer.Argument(help="The function: Dispatcher, Biller, Subscriptions or Auditor.")
    ],
    event: Annotated[
        Path,
        typer.Option(
            "--event", "-e", exists=True, dir_okay=False, help="The event, e.g. events/backfill.json."
        ),
    ],
    env_vars: Annotated[
        Path | None,
        typer.Option(
            "--env-vars",
            "-n",
            exists=True,
            dir_okay=False,
            help='SAM\'s env-vars JSON: {"Parameters": {...}, "BillerFunction": {...}}.',
        ),
    ] = None,
    template: Annotated[
        Path | None,
        typer.Option(
            "--template",
            "-t",
            exists=True,
            dir_okay=False,
            help="The SAM template (default: the project's, found from the working directory up, "
            "or BILLING_TEMPLATE).",
        ),
    ] = None,
    customers: Annotated[
        int, typer.Option(min=1, help="Demo customers to seed when the embedded stack runs.")
    ] = 300,
    seed: Annotated[int, typer.Option(help="Random seed of the demo data.")] = 42,
    marketplaces: Annotated[str, typer.Option(help="Comma-separated: aws,gcp,azure.")] = "aws,gcp,azure",
    keep_timestamps: Annotated[
        bool,
        typer.Option(
            help="Keep the event's SentTimestamp and ApproximateFirstReceiveTimestamp instead of setting"
            " them to the invocation time."
        ),
    ] = False,
) -> None:
    """Run a function's real handler once, in-process (see INVOKE_HELP)."""
    payload = _read_json(event, "--event")
    file_env = _read_json(env_vars, "--env-vars", mapping=True) if env_vars is not None else {}
    from billing_local.template import TemplateNotFoundError, find_template, function_config

    try:
        template = template or find_template()
    except TemplateNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="--template") from None
    config = function_config(template, function.logical_id)
    overrides = env_overrides(file_env, config.logical_id)
    undeclared = sorted(set(overrides) - set(config.environment))
    if undeclared:
        console.print(f"note: `sam local invoke` would ignore {', '.join(undeclared)} (not in the template)")
    declared = {k: v for k, v in config.environment.items() if v is not None and k not in os.environ}
    if _apm_captured_locally():
        # the template's transport posts to the APM extension, which is not here: captured in memory
        declared.pop(APM_TRANSPORT, None)
        if not {APM_ENABLED} & (set(os.environ) | set(overrides)):
            # the template turns the agent off without the extension layer; then no transaction exists
            # and every log line's elasticapm_labels carry trace.id null. Captured in memory, it costs
            # nothing.
            declared[APM_ENABLED] = "true"
    lambda_env = lambda_runtime_environment(config, template)
    embedded = not _database_configured({**os.environ, **declared, **overrides})
    if not embedded:
        outcome = invoke(
            config, payload, {**declared, **lambda_env, **overrides}, restamp=not keep_timestamps
        )
    else:
        outcome = _invoke_on_local_stack(
            function,
            config,
            payload,
            (declared, lambda_env, overrides),
            (customers, seed, marketplaces),
            restamp=not keep_timestamps,
        )
    typer.echo(json.dumps(outcome.response, default=str))
    if function is Function.SUBSCRIPTIONS and (why := subscriptions_hint(outcome.response, embedded)):
        console.print(why)
    if outcome.failed:
        raise typer.Exit(1)


@dataclass(frozen=True)
class Outcome:
    response: Any  # the handler's return value, or Lambda's error document
    failed: bool


def env_overrides(file_env: Mapping[str, Any], logical_id: str) -> dict[str, str]:
    """SAM's precedence: the function's own entry over "Parameters"; values stringified as SAM does."""
    for name, block in file_env.items():
        if not isinstance(block, dict):
            raise typer.BadParameter(f"--env-vars: {name!r} must map variable names to values")
    short_name = logical_id.removesuffix("Function")
    merged = {
        **file_env.get("Parameters", {}),
        **(file_env.get(logical_id) or file_env.get(short_name) or {}),
    }
    return {name: _sam_text(value) for name, value in merged.items()}


def _sam_text(value: Any) -> str:
    # SAM blanks lists, dicts and null (unresolved intrinsics) and writes booleans in lower case
    if value is None or isinstance(value, dict | list):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def lambda_runtime_environment(config: FunctionConfig, template: Path) -> dict[str, str]:
    """The variables Lambda's runtime (as SAM emulates it) sets in every execution environment."""
    from billing_local.template import function_property, load_template, resolve

    parsed = load_template(template)
    memory = resolve(parsed, function_property(parsed, config.logical_id, "MemorySize")) or 128
    runtime = resolve(parsed, function_property(parsed, config.logical_id, "Runtime")) or "python3.13"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    handler = f"{config.handler_module}.{config.handler_function}"
    name = config.logical_id
    return {
        "AWS_SAM_LOCAL": "true",
        "AWS_LAMBDA_FUNCTION_NAME": name,
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory),
        "AWS_LAMBDA_FUNCTION_TIMEOUT": str(config.timeout),
        "AWS_LAMBDA_FUNCTION_HANDLER": handler,
        "AWS_LAMBDA_LOG_GROUP_NAME": f"aws/lambda/{name}",
        "AWS_LAMBDA_LOG_STREAM_NAME": "$LATEST",
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        "AWS_ACCOUNT_ID": ACCOUNT_ID,
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
        "AWS_EXECUTION_ENV": f"AWS_Lambda_{runtime}",
        "LAMBDA_TASK_ROOT": str(config.code_uri),
        "_HANDLER": handler,
    }


def invoke(
    config: FunctionConfig,
    event: Any,
    env: Mapping[str, str],
    on_import: Callable[[ModuleType], None] | None = None,
    *,
    restamp: bool = False,
) -> Outcome:
    """Import the handler module afresh with ``env`` set, call the handler once, restore the process.

    ``on_import`` runs after the module's init code, before the call (the local stack sets the Biller's
    clock there). Whatever the module prints goes to stderr, as SAM shows a container's output. With
    ``restamp`` the SQS records' timestamps are set to the moment of the call (restamp_sqs_records).
    """
    from billing_local.stack import environment

    env = {**env}
    if _apm_captured_locally():
        env.setdefault(APM_TRANSPORT, APM_CAPTURE_TRANSPORT)
    request_id = str(uuid.uuid4())
    with environment(env), _handler_module(config) as load, contextlib.redirect_stdout(sys.stderr):
        _clear_parameter_caches()  # a new execution environment starts with none
        try:
            module = load()
        except Exception as exc:  # an init error, reported as Lambda reports it
            return Outcome(_error_document(exc, ""), failed=True)
        try:
            if on_import is not None:
                on_import(module)
            handler = getattr(module, config.handler_function)
            context = _context(config, env, request_id)
            if restamp and (restamped := restamp_sqs_records(event, int(time.time() * 1000))):
                console.print(
                    f"note: SentTimestamp and ApproximateFirstReceiveTimestamp of {restamped} record(s)"
                    " set to now: MessageAgeMs is this delivery's age (--keep-timestamps keeps the event's)"
                )
            return Outcome(handler(event, context), failed=False)
        except Exception as exc:
            return Outcome(_error_document(exc, request_id), failed=True)
        finally:
            _close_runtime(module)


def _context(config: FunctionConfig, env: Mapping[str, str], request_id: str) -> LambdaContext:
    name = env["AWS_LAMBDA_FUNCTION_NAME"]
    return LambdaContext(
        function_name=name,
        function_version=env["AWS_LAMBDA_FUNCTION_VERSION"],
        invoked_function_arn=f"arn:aws:lambda:{env['AWS_REGION']}:{ACCOUNT_ID}:function:{name}",
        memory_limit_in_mb=int(env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"]),
        aws_request_id=request_id,
        log_group_name=env["AWS_LAMBDA_LOG_GROUP_NAME"],
        log_stream_name=env["AWS_LAMBDA_LOG_STREAM_NAME"],
        deadline_ms=int(time.time() * 1000) + config.timeout * 1000,
    )


def _error_document(exc: BaseException, request_id: str) -> dict[str, Any]:
    """Lambda's answer for a function that raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    return {
        "errorMessage": str(exc),
        "errorType": type(exc).__name__,
        "requestId": request_id,
        "stackTrace": traceback.format_list(frames),
    }


@contextlib.contextmanager
def _handler_module(config: FunctionConfig) -> Iterator[Callable[[], ModuleType]]:
    """CodeUri on sys.path and a loader that imports the handler module afresh; both undone after."""
    code_root = str(config.code_uri)
    name = config.handler_module
    previous = sys.modules.pop(name, None)
    sys.path.insert(0, code_root)
    try:
        yield lambda: importlib.import_module(name)
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(code_root)
        sys.modules.pop(name, None)
        if previous is not None:
            sys.modules[name] = previous


def _close_runtime(module: ModuleType) -> None:
    """Close what the module's init opened (Lambda would just freeze or drop the environment)."""
    runtime = getattr(module, "runtime", None)
    if runtime is None:
        return
    from billing.entrypoints.loop import LOOP

    LOOP.run_until_complete(runtime.close())


def _clear_parameter_caches() -> None:
    from aws_lambda_powertools.utilities.parameters import clear_caches

    clear_caches()  # type: ignore[no-untyped-call]  # Powertools leaves it unannotated


def _apm_captured_locally() -> bool:
    return APM_TRANSPORT not in os.environ


def restamp_sqs_records(event: Any, now_ms: int) -> int:
    """Set the SQS records' send and first-receive times to ``now_ms``; return how many records changed.

    The sample events were written long before anyone invokes them: the Biller's MessageAgeMs (now minus
    SentTimestamp) would report the event file's age, not a delivery's. SQS sets both attributes when it
    sends and first delivers a message, so a fresh delivery carries the time of the invocation.
    """
    if not isinstance(event, dict) or not isinstance(event.get("Records"), list):
        return 0
    changed = 0
    for record in event["Records"]:
        attributes = record.get("attributes") if isinstance(record, dict) else None
        if isinstance(attributes, dict) and any(name in attributes for name in SQS_TIMESTAMPS):
            for name in SQS_TIMESTAMPS:
                if name in attributes:
                    attributes[name] = str(now_ms)
            changed += 1
    return changed


def _database_configured(env: Mapping[str, str]) -> bool:
    return any(env.get(name) for name in DATABASE_VARIABLES)


def _read_json(path: Path, option: str, *, mapping: bool = False) -> Any:
    try:
        document = json.loads(path.read_text())
    except ValueError as exc:
        raise typer.BadParameter(f"{path} is not JSON: {exc}", param_hint=option) from None
    if mapping and not isinstance(document, dict):
        raise typer.BadParameter(f"{path} must hold a JSON object", param_hint=option)
    return document


# --- the embedded local stack ---------------------------------------------------------------------


def _invoke_on_local_stack(
    function: Function,
    config: FunctionConfig,
    event: Any,
    layers: tuple[dict[str, str], dict[str, str], dict[str, str]],
    demo: tuple[int, int, str],
    *,
    restamp: bool,
) -> Outcome:
    """Start the local stack, seed it for the event's hour, invoke, report what the marketplaces hold."""
    from billing_local.local_run import parse_marketplaces
    from billing_local.stack import local_stack

    declared, lambda_env, overrides = layers
    customers, seed, marketplaces = demo
    try:
        chosen = parse_marketplaces(marketplaces)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--marketplaces") from None
    console.print("starting the embedded local stack: PostgreSQL, moto (SQS), the marketplace emulators")
    # Subscriptions: Google's Procurement API and Pub/Sub push signer, Azure's fulfillment API and
    # webhook signer too, and the function's settings pointing at them
    with local_stack(lifecycle=function is Function.SUBSCRIPTIONS) as stack:
        # the stack supplies what only a deploy knows (queue URL, endpoints); --env-vars still wins
        env = {**declared, **lambda_env, **stack.env, **overrides}
        hours = event_hours(function, event, env)
        _prepare_stack(stack, hours, customers, seed, chosen)
        if function is Function.DISPATCHER:
            return invoke(config, event, env, restamp=restamp)
        if function is Function.SUBSCRIPTIONS:
            from billing_local.sample_state import prepare_subscription_state

            for note in prepare_subscription_state(stack, event):
                console.print(f"note: {note}")
        now = max(p.end for p in hours) + AFTER_HOUR_END if hours else None
        if now is not None:
            for emulator in (stack.metering, stack.gcp, stack.azure):
                emulator.clock = lambda: now
            console.print(f"the marketplace emulators' and the Biller's clocks read {now.isoformat()}")
        held = stack.held_records()
        outcome = invoke(config, event, env, on_import=_set_biller_clock(now), restamp=restamp)
        after = stack.held_records()
        added = ", ".join(f"{mp} {after[mp] - held[mp]}" for mp in sorted(after))
        console.print(f"records the marketplace emulators now hold in addition: {added}")
    return outcome


def subscriptions_hint(response: Any, embedded: bool) -> str | None:
    """One line on an answer of the Subscriptions function a newcomer would not read alone: a refused
    request (401/403), an agreement with no license yet, unset Google or Azure settings."""
    if not isinstance(response, dict):
        return None
    status = response.get("statusCode")
    if status in (401, 403):
        where = (
            "this run's emulators (their keys are made per run)"
            if embedded
            else "the emulators of the configured stack; the embedded stack `billing invoke` starts"
            " without a database configured takes aws-registration.json's token"
        )
        return (
            f"refused ({status}): the request's token is not one signed or issued by {where}; the events/"
            " gcp-* and azure-* samples are signed by a throwaway key, so every handler refuses them, as"
            " events/README.md says; `billing demo` shows accepted ones"
        )
    error, message = response.get("errorType"), str(response.get("errorMessage", ""))
    if error == "UnknownAgreementError":
        return (
            f"{message}: an agreement event names only its agreement, and AWS sends a License Updated event"
            " for it too: invoke events/aws-license-updated.json first (without a database configured,"
            " `billing invoke` records one itself); EventBridge would deliver this event again later"
        )
    if error == "ValidationError" and ("PushSettings" in message or "WebhookSettings" in message):
        return (
            "the function's Google/Azure push settings (BILLING_GCP_PUSH_*, BILLING_AZURE_WEBHOOK_*) are"
            " unset: give them with --env-vars, or invoke without a database configured (its embedded"
            " stack serves Google's Procurement and Azure's fulfillment emulators and sets them)"
        )
    return None


def event_hours(function: Function, event: Any, env: Mapping[str, str]) -> list[Period]:
    """The hours (Periods) the event names: its records' periods, or the hour the Dispatcher bills."""
    from billing.domain.errors import BadMessageError, ConfigurationError

    if not isinstance(event, dict) or function in (Function.SUBSCRIPTIONS, Function.AUDITOR):
        # not an event of these functions (the handler will say so), or one that bills no hour: a
        # subscription's news, or the Auditor's day (it reads what was billed; it bills nothing)
        return []

    if function is Function.BILLER:
        from billing.domain.messages import parse_message

        hours: set[Period] = set()
        for record in event.get("Records", []):
            # a record the handler will fail (malformed, no body) names no hour
            with contextlib.suppress(BadMessageError, AttributeError, TypeError):
                hours.add(parse_message(record.get("body")).billing_period)
        return sorted(hours, key=lambda p: p.start)
    from billing.config import load_settings
    from billing.events import period_to_bill
    from billing_local.stack import environment

    try:
        with environment({**env}):
            settle = load_settings().settle_delay
        return [period_to_bill(event, settle)]
    except (BadMessageError, ConfigurationError):
        return []  # the handler will refuse it the same way


def _prepare_stack(
    stack: LocalStack, hours: list[Period], customers: int, seed: int, marketplaces: tuple[str, ...]
) -> None:
    """Migrate, seed the demo customers with usage for the hours, and subscribe them everywhere."""
    from billing.domain.model import Period
    from billing_local.local_run import seed_database, subscribe_all
    from billing_local.migrate import migrate

    asyncio.run(migrate(stack.database_url))
    last = (
        max(hours, key=lambda p: p.start)
        if hours
        else Period.last_complete_before(datetime.now(UTC), timedelta(0))
    )
    first = min(hours, key=lambda p: p.start) if hours else last
    span = int((last.start - first.start) / timedelta(hours=1)) + 1
    summary = asyncio.run(seed_database(stack.database_url, customers, span, seed, last, marketplaces))
    asyncio.run(subscribe_all(stack))
    console.print(
        f"seeded {summary.customers} customers ({', '.join(marketplaces)}) with usage for {span} hour(s)"
        f" ending {last}"
    )


def _set_biller_clock(now: datetime | None) -> Callable[[ModuleType], None] | None:
    if now is None:
        return None

    def set_clock(module: ModuleType) -> None:
        from billing.bootstrap import Runtime

        # the composition root again, with the clock: what module init builds, reading `now`
        built: Runtime = getattr(module, "runtime")  # noqa: B009 (a handler module's global)
        setattr(module, "runtime", Runtime(built.settings, clock=lambda: now))  # noqa: B010

    return set_clock

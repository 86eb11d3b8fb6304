"""Read template.yaml so local runs and tests use the deployed stack's values.

CloudFormation short tags (``!Ref``, ``!Sub``, ``!If``...) load as their long-form dicts
(``{"Ref": ...}``, ``{"Fn::Sub": ...}``). Values are resolved the way CloudFormation would with every
parameter at its default; anything only known at deploy time (resource attributes, pseudo parameters)
resolves to ``None``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import yaml

try:
    # libyaml's parser (in PyYAML's wheels): the pure-Python one took a third of a second per read of
    # template.yaml, which the template tests, the unit tier and the CLI read again and again
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # a PyYAML built without libyaml
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]

if TYPE_CHECKING:
    from collections.abc import Mapping

Template = dict[str, Any]

TEMPLATE_NAME = "template.yaml"
TEMPLATE_ENV = "BILLING_TEMPLATE"
DISTRIBUTION = "marketplace-billing"


class TemplateNotFoundError(FileNotFoundError):
    """No template.yaml where the project's root could be: say where it was looked for."""


def find_template(start: Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The project's template.yaml, however the package is installed.

    In order: the ``BILLING_TEMPLATE`` environment variable (an explicit path, which must exist); the
    first ``template.yaml`` in ``start`` (the working directory) or a directory above it, as ``sam``
    itself finds it in the working directory; the project directory the distribution was installed
    from, from its PEP 610 ``direct_url.json`` (``pip install -e .`` or ``pip install .``). A wheel
    installed from a file records no source directory: run from the project's root or set the variable.
    """
    env = os.environ if environ is None else environ
    explicit = env.get(TEMPLATE_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise TemplateNotFoundError(f"{TEMPLATE_ENV}={explicit}: no such file")
        return path.resolve()
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / TEMPLATE_NAME
        if candidate.is_file():
            return candidate
    installed = _installed_from()
    if installed is not None and (installed / TEMPLATE_NAME).is_file():
        return installed / TEMPLATE_NAME
    raise TemplateNotFoundError(
        f"no {TEMPLATE_NAME} in {here} or a directory above it, nor in the directory the "
        f"{DISTRIBUTION} package was installed from: run from the project's root or set {TEMPLATE_ENV}"
    )


def _installed_from() -> Path | None:
    """The local directory the distribution was installed from (PEP 610), if it was one."""
    try:
        text = metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    try:
        direct = json.loads(text)
    except ValueError:
        return None
    url = urlsplit(str(direct.get("url", "")))
    if url.scheme != "file" or "dir_info" not in direct:  # a wheel or an archive: no source tree
        return None
    return Path(unquote(url.path))


DISPATCHER = "DispatcherFunction"
BILLER = "BillerFunction"

# Short tags whose long form has no "Fn::" prefix ("!Ref X" -> {"Ref": "X"}).
_UNPREFIXED = frozenset({"Ref", "Condition"})
_NO_VALUE = object()
_SUB_VARIABLE = re.compile(r"\$\{([^}!]+)\}")


class CfnLoader(_SafeLoader):
    """SafeLoader that understands CloudFormation's short-form intrinsic function tags."""


def _construct_intrinsic(loader: _SafeLoader, tag_suffix: str, node: yaml.Node) -> dict[str, Any]:
    key = tag_suffix if tag_suffix in _UNPREFIXED else f"Fn::{tag_suffix}"
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if tag_suffix == "GetAtt":
            value = str(value).split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {key: value}


CfnLoader.add_multi_constructor("!", _construct_intrinsic)


def load_template(path: str | os.PathLike[str]) -> Template:
    """Parse a SAM/CloudFormation YAML template, short tags included."""
    with Path(path).open(encoding="utf-8") as f:
        loaded = yaml.load(f, Loader=CfnLoader)  # CfnLoader is a SafeLoader
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: not a template (top level is not a mapping)")
    return loaded


def _parameter_default(template: Template, name: str) -> Any:
    parameter = template.get("Parameters", {}).get(name)
    if parameter is None or "Default" not in parameter:
        return None
    default = parameter["Default"]
    if parameter.get("Type") == "CommaDelimitedList":
        return str(default).split(",")
    return default


def condition_is_true(template: Template, name: str) -> bool:
    """Evaluate a named condition with every parameter at its default."""
    return _truthy(template, template.get("Conditions", {})[name])


def _truthy(template: Template, node: Any) -> bool:
    if isinstance(node, dict) and len(node) == 1:
        ((fn, args),) = node.items()
        if fn == "Condition":
            return condition_is_true(template, args)
        if fn == "Fn::Not":
            return not _truthy(template, args[0])
        if fn == "Fn::And":
            return all(_truthy(template, a) for a in args)
        if fn == "Fn::Or":
            return any(_truthy(template, a) for a in args)
        if fn == "Fn::Equals":
            left, right = (_resolve(template, a) for a in args)
            return bool(_as_text(left) == _as_text(right))
    raise ValueError(f"not a condition: {node!r}")


def _as_text(value: Any) -> Any:
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _env_text(value: Any) -> str:
    # CloudFormation stringifies environment values; YAML booleans become "true"/"false".
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _is_intrinsic(node: dict[str, Any]) -> bool:
    return len(node) == 1 and any(key == "Ref" or key.startswith("Fn::") for key in node)


def _resolve(template: Template, node: Any) -> Any:
    if isinstance(node, list):
        items = [_resolve(template, item) for item in node]
        return [item for item in items if item is not _NO_VALUE]
    if not isinstance(node, dict):
        return node
    if not _is_intrinsic(node):
        resolved = {key: _resolve(template, value) for key, value in node.items()}
        return {key: value for key, value in resolved.items() if value is not _NO_VALUE}
    ((fn, args),) = node.items()
    if fn == "Ref":
        if args == "AWS::NoValue":
            return _NO_VALUE
        return _parameter_default(template, args)
    if fn == "Fn::If":
        condition, when_true, when_false = args
        return _resolve(template, when_true if condition_is_true(template, condition) else when_false)
    if fn == "Fn::Join":
        separator, items = args
        parts = _resolve(template, items)
        return None if parts is None or None in parts else separator.join(map(str, parts))
    if fn == "Fn::Split":
        separator, text = args
        resolved = _resolve(template, text)
        return None if resolved is None else str(resolved).split(separator)
    if fn == "Fn::Select":
        index, items = args
        resolved = _resolve(template, items)
        return None if resolved is None else resolved[int(index)]
    if fn == "Fn::Sub":
        return _resolve_sub(template, args)
    return None  # GetAtt, ImportValue, GetAZs...: only known once deployed


def _resolve_sub(template: Template, args: Any) -> Any:
    text, variables = (args, {}) if isinstance(args, str) else (args[0], args[1])
    values: dict[str, Any] = {name: _resolve(template, value) for name, value in variables.items()}
    for name in _SUB_VARIABLE.findall(text):
        if name not in values:
            values[name] = None if "." in name else _parameter_default(template, name)
    if any(values.get(name) is None for name in _SUB_VARIABLE.findall(text)):
        return None
    return _SUB_VARIABLE.sub(lambda m: str(values[m.group(1)]), text)


def resolve(template: Template, node: Any) -> Any:
    """Resolve intrinsics with parameters at their defaults; ``None`` where only a deploy knows."""
    value = _resolve(template, node)
    return None if value is _NO_VALUE else value


def resource(template: Template, logical_id: str) -> dict[str, Any]:
    """The resource with this logical id (``KeyError`` if absent)."""
    found: dict[str, Any] = template["Resources"][logical_id]
    return found


def function_property(template: Template, logical_id: str, name: str) -> Any:
    """A function property, falling back to ``Globals.Function`` as SAM does."""
    properties = resource(template, logical_id).get("Properties", {})
    if name in properties:
        return properties[name]
    return template.get("Globals", {}).get("Function", {}).get(name)


def _get_att_target(node: Any) -> str:
    if isinstance(node, dict) and "Fn::GetAtt" in node:
        target: str = node["Fn::GetAtt"][0]
        return target
    raise ValueError(f"expected !GetAtt <Queue>.Arn, got {node!r}")


def _int(template: Template, node: Any) -> int:
    value = resolve(template, node)
    if value is None:
        raise ValueError(f"{node!r} has no default value")
    return int(value)


MARKETPLACES = ("aws", "gcp", "azure")


def _sqs_events(template: Template, logical_id: str) -> dict[str, dict[str, Any]]:
    """Every SQS event source of a function, by the logical id of its queue."""
    events = resource(template, logical_id).get("Properties", {}).get("Events", {})
    return {
        _get_att_target(e["Properties"]["Queue"]): e["Properties"]
        for e in events.values()
        if e.get("Type") == "SQS"
    }


@dataclass(frozen=True)
class LaneDefaults:
    """One marketplace's lane: its queue, dead-letter queue, event source mapping and quota."""

    marketplace: str
    queue: str  # logical ids
    dlq: str
    max_concurrency: int
    batch_size: int
    visibility_timeout: int
    max_receive_count: int
    dlq_retention_seconds: int
    quota_per_second: float  # 0 = unpaced

    @property
    def pace_per_environment(self) -> float | None:
        """Calls a second each of the lane's environments may start (quota / MaximumConcurrency)."""
        return self.quota_per_second / self.max_concurrency if self.quota_per_second else None


def lanes_from_template(template: Template) -> tuple[LaneDefaults, ...]:
    """The Biller's lanes, found through its BILLING_<MARKETPLACE>_QUEUE_URL variables."""
    variables = resource(template, BILLER).get("Properties", {}).get("Environment", {}).get("Variables", {})
    events = _sqs_events(template, BILLER)
    lanes = []
    for marketplace in MARKETPLACES:
        ref = variables.get(f"BILLING_{marketplace.upper()}_QUEUE_URL")
        if not isinstance(ref, dict) or "Ref" not in ref:
            raise ValueError(f"{BILLER} has no BILLING_{marketplace.upper()}_QUEUE_URL: !Ref <queue>")
        queue_id = ref["Ref"]
        event = events.get(queue_id)
        if event is None:
            raise ValueError(f"{BILLER} has no SQS event source on {queue_id}")
        queue = resource(template, queue_id)["Properties"]
        redrive = queue["RedrivePolicy"]
        dlq_id = _get_att_target(redrive["deadLetterTargetArn"])
        dlq = resource(template, dlq_id)["Properties"]
        quota = resolve(template, variables.get(f"BILLING_{marketplace.upper()}_QUOTA_PER_SECOND", 0))
        lanes.append(
            LaneDefaults(
                marketplace=marketplace,
                queue=queue_id,
                dlq=dlq_id,
                max_concurrency=_int(template, event["ScalingConfig"]["MaximumConcurrency"]),
                batch_size=_int(template, event.get("BatchSize", 10)),
                visibility_timeout=_int(template, queue.get("VisibilityTimeout", 30)),
                max_receive_count=_int(template, redrive["maxReceiveCount"]),
                dlq_retention_seconds=_int(template, dlq.get("MessageRetentionPeriod", 345600)),
                quota_per_second=float(quota or 0),
            )
        )
    return tuple(lanes)


@dataclass(frozen=True)
class StackDefaults:
    """Queue and function limits of the stack as deployed with default parameters.

    The per-queue figures are the tightest of the lanes' (tests/template checks that they agree).
    """

    biller_max_concurrency: int  # the lanes' MaximumConcurrency summed
    biller_reserved_concurrency: int
    biller_batch_size: int
    biller_timeout: int
    queue_visibility_timeout: int
    max_receive_count: int
    dlq_retention_seconds: int
    dispatcher_timeout: int
    lanes: tuple[LaneDefaults, ...] = ()

    def lane(self, marketplace: str) -> LaneDefaults:
        return next(lane for lane in self.lanes if lane.marketplace == marketplace)

    @classmethod
    def from_template(cls, template: Template) -> StackDefaults:
        """Read the defaults from an already parsed template."""
        lanes = lanes_from_template(template)
        return cls(
            biller_max_concurrency=sum(lane.max_concurrency for lane in lanes),
            biller_reserved_concurrency=_int(
                template, function_property(template, BILLER, "ReservedConcurrentExecutions")
            ),
            biller_batch_size=max(lane.batch_size for lane in lanes),
            biller_timeout=_int(template, function_property(template, BILLER, "Timeout")),
            queue_visibility_timeout=min(lane.visibility_timeout for lane in lanes),
            max_receive_count=min(lane.max_receive_count for lane in lanes),
            dlq_retention_seconds=min(lane.dlq_retention_seconds for lane in lanes),
            dispatcher_timeout=_int(template, function_property(template, DISPATCHER, "Timeout")),
            lanes=lanes,
        )


def stack_defaults(path: str | os.PathLike[str]) -> StackDefaults:
    """Queue and function limits from template.yaml, parameters at their defaults."""
    return StackDefaults.from_template(load_template(path))


@dataclass(frozen=True)
class FunctionConfig:
    """What a local invoke needs to run a function the way the stack would."""

    logical_id: str
    code_uri: Path
    handler_module: str
    handler_function: str
    timeout: int
    environment: dict[str, str | None]


def function_config(path: str | os.PathLike[str], logical_id: str) -> FunctionConfig:
    """Code location, handler and environment of ``Dispatcher``/``Biller`` (or a full logical id).

    Environment values resolve to parameter defaults; ``None`` marks a value only a deploy knows
    (queue URLs, other resources), which the local runner must supply itself.
    """
    template = load_template(path)
    if logical_id not in template["Resources"]:
        logical_id = f"{logical_id}Function"
    module, _, function = str(function_property(template, logical_id, "Handler")).rpartition(".")
    globals_env = template.get("Globals", {}).get("Function", {}).get("Environment", {})
    own_env = resource(template, logical_id).get("Properties", {}).get("Environment", {})
    variables = {**globals_env.get("Variables", {}), **own_env.get("Variables", {})}
    environment: dict[str, str | None] = {}
    for name, node in variables.items():
        value = _resolve(template, node)
        if value is _NO_VALUE:
            continue
        environment[name] = None if value is None else _env_text(value)
    code_uri = resource(template, logical_id)["Properties"]["CodeUri"]
    return FunctionConfig(
        logical_id=logical_id,
        code_uri=Path(path).resolve().parent / str(code_uri),
        handler_module=module,
        handler_function=function,
        timeout=_int(template, function_property(template, logical_id, "Timeout")),
        environment=environment,
    )

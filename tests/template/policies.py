"""IAM statements of a template, raw or as SAM transforms it, with AWS managed policies expanded.

Shared by test_template.py (the raw template, no SAM needed) and test_iam.py (SAM's output).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

Template = dict[str, Any]

# The AWS managed policies SAM can attach, as the AWS Managed Policy Reference documents them.
_MANAGED = json.loads((Path(__file__).parent / "aws_managed_policies.json").read_text(encoding="utf-8"))
AWS_MANAGED_POLICIES: Mapping[str, Any] = {k: v for k, v in _MANAGED.items() if not k.startswith("_")}

# Actions that support no resource-level permissions, so "*" is their only valid Resource. Each is
# documented by AWS as such; nothing else may be granted on "*".
DOCUMENTED_STAR_ACTIONS: Mapping[str, str] = {
    "aws-marketplace:BatchMeterUsage": (
        "Service Authorization Reference, AWS Marketplace Metering Service: no resource types"
    ),
    "aws-marketplace:ResolveCustomer": (
        "Service Authorization Reference, AWS Marketplace Metering Service: no resource types"
    ),
    "ec2:DescribeNetworkInterfaces": (
        "AWS Lambda Developer Guide, VPC execution role permissions: works only on Resource '*'"
    ),
    "ec2:DescribeSubnets": (
        "Service Authorization Reference, Amazon EC2: Describe* actions have no resource types"
    ),
}


def each(node: Any) -> Iterator[Any]:
    """Every value a node can take: lists flattened, both branches of each Fn::If, NoValue dropped."""
    if isinstance(node, list):
        for item in node:
            yield from each(item)
    elif isinstance(node, dict) and set(node) == {"Fn::If"}:
        _condition, when_true, when_false = node["Fn::If"]
        yield from each(when_true)
        yield from each(when_false)
    elif node == {"Ref": "AWS::NoValue"} or node is None:
        return
    else:
        yield node


def _managed_arn_key(arn: Any) -> str | None:
    """An AWS managed policy ARN in the aws partition's spelling, or None if it is not one."""
    text = arn.get("Fn::Sub") if isinstance(arn, dict) else arn
    if not isinstance(text, str):
        return None
    text = text.replace("${AWS::Partition}", "aws")
    for partition in ("aws-cn", "aws-us-gov"):
        text = text.replace(f"arn:{partition}:", "arn:aws:")
    return text if text.startswith("arn:aws:iam::aws:policy/") else None


def _documents_of_role(template: Template, properties: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for policy in each(properties.get("Policies", [])):
        yield policy.get("PolicyName", "inline"), policy["PolicyDocument"]
    for arn in each(properties.get("ManagedPolicyArns", [])):
        if isinstance(arn, dict) and "Ref" in arn:
            target = template["Resources"].get(arn["Ref"], {})
            if target.get("Type") == "AWS::IAM::ManagedPolicy":
                yield arn["Ref"], target["Properties"]["PolicyDocument"]
                continue
        key = _managed_arn_key(arn)
        if key is None or key not in AWS_MANAGED_POLICIES:
            # a policy nobody can read cannot be checked: it fails the check like a "*" would
            yield (
                f"unknown managed policy {arn!r}",
                {"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]},
            )
            continue
        yield key.rsplit("/", 1)[-1], AWS_MANAGED_POLICIES[key]


def iam_statements(template: Template) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, statement) for every identity-policy statement the stack grants.

    Roles' inline and managed policies (AWS managed ones expanded from aws_managed_policies.json,
    customer managed ones from the template), standalone IAM policies and the inline statements of
    SAM functions (in a raw template; SAM's output has none). Both branches of every Fn::If count.
    """
    for logical_id, res in template["Resources"].items():
        properties = res.get("Properties", {})
        documents: list[tuple[str, Any]] = []
        if res["Type"] == "AWS::IAM::Role":
            documents = list(_documents_of_role(template, properties))
        elif res["Type"] in {"AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"}:
            # also attached through their own Roles property, which a role does not show
            documents = [("policy", properties["PolicyDocument"])]
        elif res["Type"] == "AWS::Serverless::Function":
            # SAM policy templates and managed policy names are SAM's to expand: test_iam.py sees them
            documents = [("inline", p) for p in each(properties.get("Policies", [])) if "Statement" in p]
        for name, document in documents:
            for statement in each(document["Statement"]):
                yield f"{logical_id} ({name})", statement


def star_resource_problems(template: Template) -> list[str]:
    """Allow statements on Resource "*" (or NotResource) for anything but the documented actions."""
    problems = []
    for where, statement in iam_statements(template):
        if statement.get("Effect") != "Allow":
            continue
        if "NotResource" in statement:
            problems.append(f"{where}: NotResource grants everything else")
        actions = [a for a in each(statement.get("Action", [])) if isinstance(a, str)]
        if "*" in list(each(statement.get("Resource", []))):
            undocumented = sorted(a for a in actions if a not in DOCUMENTED_STAR_ACTIONS)
            if undocumented or not actions:
                problems.append(f"{where}: Resource '*' for {undocumented or actions!r}")
    return problems


def wildcard_action_problems(template: Template) -> list[str]:
    problems = []
    for where, statement in iam_statements(template):
        if statement.get("Effect") != "Allow":
            continue
        if "NotAction" in statement:
            problems.append(f"{where}: NotAction grants everything else")
        problems += [
            f"{where}: wildcard action {action!r}"
            for action in each(statement.get("Action", []))
            if isinstance(action, str) and "*" in action
        ]
    return problems


def managed_policy_names(template: Template) -> list[str]:
    """The AWS managed policies attached to the template's roles (by name)."""
    names = []
    for res in template["Resources"].values():
        if res["Type"] == "AWS::IAM::Role":
            for arn in each(res.get("Properties", {}).get("ManagedPolicyArns", [])):
                key = _managed_arn_key(arn)
                if key is not None:
                    names.append(key.rsplit("/", 1)[-1])
    return names

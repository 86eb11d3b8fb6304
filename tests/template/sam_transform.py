"""Print the CloudFormation that SAM makes of a template, as JSON: `sam_transform.py TEMPLATE`.

Runs with the SAM CLI's interpreter (.venv-sam), never the project's: aws-sam-cli pins a boto3 that
aioboto3's botocore pin excludes, so the two cannot share a venv and the template tests call this
script in a subprocess. It is what `sam validate` does: SamTemplateValidator swaps local CodeUri
paths for S3 URIs and runs the SAM translator, whose output is what CloudFormation deploys (the
translator maps managed policy names to ARNs from its own bundled list, so nothing here calls AWS).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from samcli.lib.translate.sam_template_validator import SamTemplateValidator
from samcli.yamlhelper import yaml_parse


class _NoIamLookups:
    """A managed policy name SAM's bundled list does not know stays a bare name: the tests reject it."""

    def load(self) -> dict[str, str]:
        return {}


def main(path: str) -> None:
    template: dict[str, Any] = yaml_parse(Path(path).read_text(encoding="utf-8"))
    # a fixed region: SAM builds partition-specific ARNs from it, and no credentials are needed
    validator = SamTemplateValidator(template, _NoIamLookups(), region="us-east-1")  # type: ignore[arg-type]
    json.dump(yaml_parse(validator.get_translated_template_if_valid()), sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])

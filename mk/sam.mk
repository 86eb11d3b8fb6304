# SAM / CloudFormation targets. Included by the top-level Makefile (`include mk/sam.mk`);
# also usable on its own: `make -f mk/sam.mk check-template`.
#
# The SAM CLI lives in its own venv: aws-sam-cli pins boto3 1.43.x while aioboto3 15.5 pins
# botocore < 1.40.62, so the two can never share .venv.

# Whatever the includer's default goal is (or will be), this file must not take it over.
_SAM_MK_DEFAULT_GOAL := $(.DEFAULT_GOAL)

SAM_HOST_PYTHON ?= python3
SAM_VENV ?= .venv-sam
SAM_CLI_SPEC ?= aws-sam-cli==1.170.0
SAM ?= $(SAM_VENV)/bin/sam
SAM_CFN_LINT ?= $(SAM_VENV)/bin/cfn-lint
SAM_TEMPLATE ?= template.yaml
SAM_CONFIG_ENV ?= dev
SAM_REGION ?= us-east-1
# The project's own venv (pytest + PyYAML); the top-level Makefile owns how it is created.
SAM_PROJECT_PYTHON ?= .venv/bin/python
# No telemetry round-trips from CI or offline machines.
SAM_CLI_ENV ?= SAM_CLI_TELEMETRY=0

.PHONY: sam-venv sam-build check-template sam-clean

$(SAM):
	$(SAM_HOST_PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check '$(SAM_CLI_SPEC)' cfn-lint
	@touch $@

$(SAM_CFN_LINT): $(SAM)

sam-venv: $(SAM)

# Every function and the layer use `BuildMethod: makefile`, so no python3.13 is needed on PATH and
# no Docker: the layer Makefile asks pip for manylinux2014_aarch64 / cp313 wheels.
# LAYER_PYTHON: shared/Makefile runs pip from the SAM venv, which always has pip (a bare Debian
# python3 may not).
sam-build: $(SAM)
	$(SAM_CLI_ENV) LAYER_PYTHON=$(abspath $(SAM_VENV))/bin/python \
		$(SAM) build --template-file $(SAM_TEMPLATE) --config-env $(SAM_CONFIG_ENV)

# Linters check structure only; tests/template checks the values inside (cron, concurrency, IAM,
# alarms, the prod VPC...). Its IAM checks run on what SAM makes of the template: the tests call
# tests/template/sam_transform.py with the SAM venv's python (the project venv cannot import SAM).
# BILLING_SAM_PYTHON makes a broken SAM venv a failure here, where a bare `make test` would skip them.
check-template: $(SAM) $(SAM_CFN_LINT) | $(SAM_PROJECT_PYTHON)
	$(SAM_CLI_ENV) $(SAM) validate --lint --template-file $(SAM_TEMPLATE) --region $(SAM_REGION)
	$(SAM_CFN_LINT) $(SAM_TEMPLATE)
	BILLING_SAM_PYTHON=$(abspath $(SAM_VENV))/bin/python $(SAM_PROJECT_PYTHON) -m pytest tests/template -q

sam-clean:
	rm -rf .aws-sam

.DEFAULT_GOAL := $(_SAM_MK_DEFAULT_GOAL)

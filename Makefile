# The README's two commands are `make demo` and `make test`; .ci/run calls `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help setup demo test lint fmt unit integration bench bench-core bench-check kafka-start kafka-stop constraints clean

help:
	@echo "make demo   - set up, start a local Kafka and run the anonymiser on generated CDRs"
	@echo "make test   - set up, lint (ruff, mypy --strict) and run the whole test suite"
	@echo "make lint | unit | integration | bench | bench-check | kafka-start | kafka-stop | clean"

setup:
	@scripts/bootstrap.sh

demo: setup
	@$(PY) -m service.demo

lint: setup
	ruff check service tests benchmarks
	ruff format --check service tests benchmarks
	mypy --strict service tests benchmarks

fmt: setup
	ruff check --fix service tests benchmarks
	ruff format service tests benchmarks

unit: setup
	$(PY) -m pytest tests/unit

integration: setup
	$(PY) -m pytest tests/integration

test: lint
	$(PY) -m pytest tests --durations=15

bench: setup
	$(PY) -m benchmarks.run

# A short run compared with the last committed benchmarks/results/bench.json as ratios;
# fails on a > 25% drop. Not part of `make test` (timings are not tests).
bench-check: setup
	$(PY) -m benchmarks.check

bench-core: setup
	$(PY) -m benchmarks.transform_bench

kafka-start: setup
	@deploy/kafka/kafka.sh start

kafka-stop:
	@deploy/kafka/kafka.sh stop

constraints: setup
	$(PY) -m pip freeze --exclude-editable | sed '1i # Pinned versions for a reproducible environment (pip install -c constraints.txt).\n# Regenerate after changing dependencies: make constraints' > constraints.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info

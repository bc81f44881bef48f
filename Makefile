# sluice: `make run` runs the example pipeline; `make lint` runs ruff and mypy; `make test` runs the test suite.
# The venv is created on first use and re-installed only when pyproject.toml changes (stamp file).

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run lint test test-slow test-faults bench bench-faults bench-hosts venv clean histories

venv: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/sluice run examples/clicks.yaml

# ruff (lint, import order) on the whole tree and mypy on the sluice package (config in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Everything but the slow tests (fault injection, several machines): under 15 minutes on 2 cores.
test: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow" $(PYTEST_ARGS)

# The slow tests alone: the fault x state suite (tests/faults) and the multi-host tests
# (tests/multihost, network namespaces: root only, skipped elsewhere). CI runs them after `test`.
test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow $(PYTEST_ARGS)

# Regenerate the JobWorkflow history corpus (tests/histories/README.md); commit what it writes.
histories: $(STAMP)
	$(VENV)/bin/python -m tests.histories.generate

# The fault x state suite alone (docs/reliability.md); `make test-slow` runs it too.
test-faults: $(STAMP)
	$(VENV)/bin/pytest -q tests/faults $(PYTEST_ARGS)

# The fault x state table of docs/reliability.md: the suite run FAULT_RUNS times, medians.
FAULT_RUNS ?= 3
bench-faults: $(STAMP)
	PYTHONPATH=. $(VENV)/bin/python bench/faults.py --runs $(FAULT_RUNS)

# Start and recovery with `sluice host` processes, cold vs warm runners (bench/README.md).
# Options: make bench-hosts HOSTS_ARGS=--quick
bench-hosts: $(STAMP)
	PYTHONPATH=. $(VENV)/bin/python bench/hosts.py $(HOSTS_ARGS)

# The bench extra (bytewax, for the data-plane comparison) is installed on first use.
# Options for the data-plane benchmark: make bench DATAPLANE_ARGS=--quick
bench: $(STAMP)
	@$(VENV)/bin/python -c 'import bytewax' 2>/dev/null || $(VENV)/bin/pip install -q -e '.[test,bench]'
	@echo "== bench/lifecycle.py"
	PYTHONPATH=. $(VENV)/bin/python bench/lifecycle.py
	@echo "== bench/dataplane.py"
	PYTHONPATH=. $(VENV)/bin/python bench/dataplane.py $(DATAPLANE_ARGS)

clean:
	rm -rf .sluice out .pytest_cache

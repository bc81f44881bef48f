# sluice: `make run` runs the example pipeline; `make test` runs the test suite.
# The venv is created on first use and re-installed only when pyproject.toml changes (stamp file).

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run test test-slow bench venv clean

venv: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/sluice run examples/clicks.yaml

test: $(STAMP)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow $(PYTEST_ARGS)

bench: $(STAMP)
	@if ls bench/*.py >/dev/null 2>&1; then \
	  for b in bench/*.py; do echo "== $$b"; PYTHONPATH=. $(VENV)/bin/python $$b || exit 1; done; \
	else echo "no benchmarks in bench/"; fi

clean:
	rm -rf .sluice out .pytest_cache

# raftpbx: the two commands a user needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo
NODES ?= 3

.PHONY: run test lint unit integration bench chaos chaos-smoke clean venv stop

$(VENV)/.stamp: pyproject.toml scripts/bootstrap.sh
	./scripts/bootstrap.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $@

venv: $(VENV)/.stamp

## Start a local 3-node cluster on loopback with demo extensions (Ctrl-C stops it).
run: venv
	$(VENV)/bin/raftpbx demo --nodes $(NODES) --workdir $(WORKDIR) --softphone-help

stop: venv
	$(VENV)/bin/raftpbx demo --stop --workdir $(WORKDIR)

lint: venv
	$(VENV)/bin/ruff check state transport raftpbx chaos tests bench
	$(VENV)/bin/mypy state transport
	$(VENV)/bin/mypy raftpbx chaos

## Everything CI runs: tools the tests need, lint, unit and integration tests.
test: venv
	./scripts/bootstrap.sh --test
	$(MAKE) lint
	$(PY) -m pytest -q tests

unit: venv
	$(PY) -m pytest -q tests --ignore=tests/integration

integration: venv
	$(PY) -m pytest -q tests/integration

bench: venv
	$(PY) bench/replication.py
	$(PY) bench/sip_codec.py

chaos-smoke: venv
	@echo "chaos suite: not built yet (issue 7)"; exit 1

chaos: venv
	@echo "chaos suite: not built yet (issue 7)"; exit 1

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache workdir

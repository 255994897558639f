# raftpbx: the two commands a user needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo
NODES ?= 3

.PHONY: run test test-compiled lint unit integration bench chaos chaos-smoke clean venv stop

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
	$(VENV)/bin/ruff check state transport raftpbx chaos tests bench setup.py
	$(VENV)/bin/mypy state transport
	$(VENV)/bin/mypy raftpbx chaos

## Everything CI runs: tools the tests need, lint, unit and integration tests, then the compiled cores' tests.
test: venv
	PYTHON_FOR_BUILD=$(PYTHON) ./scripts/bootstrap.sh --test
	$(MAKE) lint
	$(PY) -m pytest -q tests
	$(MAKE) test-compiled

## A normal install compiles the hot cores with mypyc (setup.py); the dev venv above is editable and runs the
## source. This installs the compiled build in a venv of its own and runs the tests of the code it compiles
## (transport/, state/, and the node's SIP path: raftpbx/sipnode, registrar, proxy, calls), from outside the
## checkout so that nothing imports the source by accident; tests/conftest.py fails the run if a module listed
## in setup.py is not compiled. The two deselected tests check the source tree's own hook path, which an
## installed package does not have.
COMPILED_VENV ?= .venv-compiled
CORE_SOURCES := setup.py pyproject.toml $(wildcard transport/*.py transport/sip/*.py state/*.py raftpbx/*.py)
$(COMPILED_VENV)/.stamp: $(CORE_SOURCES)
	test -x $(COMPILED_VENV)/bin/python || $(PYTHON) -m venv $(COMPILED_VENV)
	$(COMPILED_VENV)/bin/python -m pip install -q --upgrade pip
	RAFTPBX_MYPYC=1 $(COMPILED_VENV)/bin/python -m pip install -q '.[test]'
	touch $@

test-compiled: $(COMPILED_VENV)/.stamp
	mkdir -p build/test-compiled
	cd build/test-compiled && RAFTPBX_EXPECT_COMPILED=1 $(abspath $(COMPILED_VENV))/bin/pytest -q -p no:cacheprovider \
		-k "not default_hook" $(abspath tests/transport) $(abspath tests/node) \
		$(abspath tests/state)

unit: venv
	$(PY) -m pytest -q tests --ignore=tests/integration

integration: venv
	$(PY) -m pytest -q tests/integration

## Benchmarks (not tests; bench/README.md): the Kamailio comparison (register, calls), failover, footprint.
## One part: make bench PARTS="register calls". The full footprint part takes over an hour.
## The nodes run as a deployment runs them: the distribution's python3 (Debian's is built with PGO and LTO;
## deploy/ssh makes the hosts' venvs from it) and a normal install, whose cores are compiled with mypyc
## (setup.py), in a venv of its own; BENCH_PYTHON overrides. Reinstalled when any source changes.
PARTS ?= all
BENCH_PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo $(PYTHON))
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.stamp: setup.py pyproject.toml $(shell find state transport raftpbx chaos -name '*.py')
	PYTHON_FOR_BUILD=$(BENCH_PYTHON) ./scripts/bootstrap.sh --bench
	test -x $(BENCH_VENV)/bin/python || $(BENCH_PYTHON) -m venv $(BENCH_VENV) || \
		{ apt-get install -y -q python3-venv && $(BENCH_PYTHON) -m venv $(BENCH_VENV); }
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	RAFTPBX_MYPYC=1 $(BENCH_VENV)/bin/python -m pip install -q '.[test]'
	touch $@

bench: venv $(BENCH_VENV)/.stamp
	$(BENCH_VENV)/bin/python bench/suite.py $(PARTS)

## Chaos suite (issue 7, docs/chaos.md). Smoke: 3 nodes on loopback, leader kill / partition / pause mid-call.
SEED ?= 1
chaos-smoke: venv
	$(PY) -m chaos run --scenario smoke --seed $(SEED)

## Full chaos run (root): 100 mixed rounds on 3 nodes and 30 on 5 (loopback), then the network faults in the netns lab.
chaos: venv
	$(PY) -m chaos run --scenario mixed --rounds 100 --seed $(SEED)
	$(PY) -m chaos run --scenario mixed5 --rounds 30 --seed $(SEED)
	$(PY) -m chaos run --scenario network --lab netns --rounds 12 --seed $(SEED)

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(COMPILED_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache workdir

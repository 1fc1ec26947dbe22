# Everyday tasks. `make quickstart` and `make test` each work on a fresh machine with python3.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first and on its own so that a CPU wheel (or the build of your choice) is
# used instead of whatever a resolver would pull in through the other dependencies.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install test test-all quality completions quickstart clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev,sim]"

test: install
	$(BIN)/python -m pytest

test-all: install
	$(BIN)/python -m pytest -m ""

quality: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy vlacl tests bench

completions: install
	for shell in bash zsh fish; do \
		_VLACL_COMPLETE=source_$$shell $(BIN)/python -m vlacl > completions/vlacl.$$shell; \
	done

quickstart: install
	PATH="$(abspath $(BIN)):$$PATH" bash examples/quickstart.sh runs/quickstart

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache .hypothesis

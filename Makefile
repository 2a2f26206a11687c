# iotplatform. The two commands: `make run` (whole platform, embedded parts, demo data) and
# `make test`. Both create .venv and install the pinned requirements on first use, and again only
# when requirements.txt changes.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.requirements-installed

.DEFAULT_GOAL := help
.PHONY: help venv run test lint format

help:
	@echo "make run          start web, broker, listener, worker, beat and simulator (Ctrl-C stops)"
	@echo "make test         run the test suite (ARGS='-k name' to select)"
	@echo "make lint         ruff check, ruff format --check, makemigrations --check"
	@echo "make format       ruff format + ruff check --fix"
	@echo "make bench-NAME   run bench/NAME/run.py (e.g. make bench-ingest)"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "iotplatform needs Python 3.11 or newer; found '$(PYTHON)'. Try: make PYTHON=/path/to/python3.11 ..." >&2; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "Could not create $(VENV). On Debian/Ubuntu: apt install python3-venv" >&2; exit 1; }

# Order-only on the interpreter: a new symlink mtime must not trigger a reinstall.
$(STAMP): requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check -r requirements.txt
	@touch $@

venv: $(STAMP)

run: venv
	$(BIN)/python scripts/run.py

test: venv
	$(BIN)/pytest $(ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python manage.py makemigrations --check --dry-run

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-%: venv
	@test -f bench/$*/run.py || { echo "no benchmark at bench/$*/run.py" >&2; exit 1; }
	$(BIN)/python bench/$*/run.py

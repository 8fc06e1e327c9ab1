# Two commands from a fresh clone: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo test lint typecheck pytest bench clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[dev,bench]'
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/nurture demo

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests flows benchmarks
	$(BIN)/ruff format --check src tests flows benchmarks

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

# The HTML report's test opens it in headless Chromium (Debian's package); quick when already installed.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

pytest: $(VENV)/.installed-dev browser
	$(BIN)/pytest

test: lint typecheck pytest

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/imports.py
	$(BIN)/python benchmarks/next_visit.py
	$(BIN)/python benchmarks/outbox.py
	$(BIN)/python benchmarks/rendering.py
	$(BIN)/python benchmarks/template_tools.py
	$(BIN)/python benchmarks/sendgrid_channel.py
	$(BIN)/python benchmarks/sendgrid_channel.py --messages 2000 --faults 0.1
	$(BIN)/python benchmarks/webhooks.py

clean:
	rm -rf $(VENV) nurture.db nurture.db-* outbox demo

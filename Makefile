VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo lint format typecheck test check

install:
	python3 -m venv $(VENV) && $(BIN)/pip install -e '.[dev]'

demo:
	$(BIN)/choreo demo

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

typecheck:
	$(BIN)/mypy

test:
	$(BIN)/pytest

check: lint typecheck test

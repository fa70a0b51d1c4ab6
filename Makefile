# The README's two commands: `make run` and `make test`. Each installs everything first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test lint lock bench clean-runs

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'

run: install
	$(BIN)/atlas run

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -p no:cacheprovider

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

lock: install
	(echo "# Exact versions of every package, used as pip constraints: pip install -c requirements.lock -e '.[test]'"; \
	 echo "# Regenerate after changing pyproject.toml dependencies: make lock"; \
	 $(BIN)/pip freeze --exclude-editable | grep -v '^feature-atlas' | sed 's/+cpu$$//') > requirements.lock

bench: install
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

# The README's two commands: `make run` and `make test`. Each installs everything first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install browser run test test-fast lint lock bench clean-runs

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'

# Chromium from Debian packages, for the browser test (tests/report/test_browser.py):
# idempotent; installs only as root with apt-get, otherwise says so and the test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "make browser: chromium not installed (needs root and apt-get); the browser test will skip"; }

run: install
	$(BIN)/atlas run

# Two pytest workers (pytest-xdist), one BLAS thread each; the tests that share the tiny
# pipeline run on one of them (tests/conftest.py). TEST_WORKERS=0: one process, as before.
TEST_WORKERS ?= 2
test: install browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -p no:cacheprovider -n $(TEST_WORKERS)

# The developer loop: everything but the end-to-end tests marked `slow` (CI runs all).
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -p no:cacheprovider -n $(TEST_WORKERS) -m "not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

lock: install
	(echo "# Exact versions of every package, used as pip constraints: pip install -c requirements.lock -e '.[test]'"; \
	 echo "# Regenerate after changing pyproject.toml dependencies: make lock"; \
	 $(BIN)/pip freeze --exclude-editable | grep -v '^feature-atlas' | sed 's/+cpu$$//') > requirements.lock

bench: install
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

# Rookery: `make run` starts a development node; `make test` runs every test.
# Both set up what they need first (.venv, pinned dependencies, Debian tools).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench setup system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV) || { apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Debian packages the tests drive (real clients); installed only if missing.
system-deps:
	@command -v mbsync >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq isync >/dev/null; \
	  else echo "note: mbsync (Debian package isync) is missing; its tests will fail"; fi; }

run: $(STAMP)
	$(BIN)/rookery serve --config deploy/dev.toml

test: $(STAMP) system-deps
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) data .pytest_cache .hypothesis

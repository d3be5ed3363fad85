# Two commands on a fresh machine: `make demo` and `make test` (CI runs `make test` via .ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv protos test unit e2e demo clean

# The virtualenv with the package (editable) and everything the tests need.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Regenerate authz_service/_proto from protos/ (a test fails when they drift).
protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py

test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider

unit: $(STAMP)
	$(BIN)/pytest -q -m "not e2e"

e2e: $(STAMP)
	$(BIN)/pytest -q -m e2e

demo: $(STAMP)
	$(BIN)/python tools/demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

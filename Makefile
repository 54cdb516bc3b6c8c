# Two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-12)

.PHONY: setup demo test test-fast clean

# Creates .venv and installs the project (scripts/setup.sh), again when either file changes.
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	PY=$(PY) VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

# The README demo: `dresd demo` (packaged ShareGPT datastore, then greedy vs DReSD).
demo: setup
	$(BIN)/dresd demo

# The whole suite, every tier included (the CI command).
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

# Everything but the slow tiers (markers in pyproject.toml): no real model, no Ray, no child processes.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not real_model and not ray and not subprocess and not cluster"

# Removes .venv and runs/.
clean:
	rm -rf $(VENV) runs

# The two quickstart commands (see README.md). Both create .venv and install the project into
# it (a regular install, so that twistd finds the bwraft dropin in site-packages).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
CLUSTER ?= cluster

.PHONY: demo test install down clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 'setuptools>=68' wheel

install: $(BIN)/python
	$(BIN)/python -m pip install -q '.[test]'

# Start a local 3-voter cluster in ./cluster (or reuse it) and show writes and reads through it.
demo: install
	$(BIN)/bwraft demo --dir $(CLUSTER)

# Stop the demo cluster.
down:
	$(BIN)/bwraft cluster down --dir $(CLUSTER)

# The whole test suite. PostgreSQL storage tests run when BWRAFT_TEST_PG_URL names a server
# (.ci/postgres.sh starts one and prints its URL).
test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) build *.egg-info

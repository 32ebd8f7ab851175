# The quick start: `make bench` (install + microbenchmarks), `make test` (install + every test).
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install bench cmake test gpu-check

# torch is never left to pip's resolver: an existing torch (e.g. a CUDA build) is kept, and a bare
# machine gets the pinned CPU wheel. Triton 3.6 matches the GPU machines (and its CPU interpreter
# runs the Triton kernels in the tests when there is no GPU).
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PYTHON) -c "import triton" 2>/dev/null || $(PIP) install triton==3.6.0
	$(PIP) install --no-build-isolation -e ".[test,bench]"
	@# Without a GPU the tests run Triton's interpreter, which numpy 2.4 breaks (int() of a 1-element array).
	$(PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || $(PIP) install "numpy<2.4"

bench: install
	$(PYTHON) -m musetalk_fast.bench.run

# The pointer-level kernels without torch: CPU math checked by ctest, .cu files compiled by nvcc.
cmake:
	@if command -v cmake >/dev/null; then \
		cmake -S . -B build/cmake && cmake --build build/cmake -j 2 && ctest --test-dir build/cmake --output-on-failure; \
	else echo "cmake not found: skipping the torch-free kernel build"; fi

test: install cmake
	$(PYTHON) -m pytest tests -q

# On a GPU machine with torch, Triton and the test tools already there (e.g. an offline one): build
# the CUDA extension, run every test on the GPU, then the benchmarks, in one go.
gpu-check:
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PYTHON) -m pytest tests -q -x
	$(PYTHON) -m musetalk_fast.bench.run

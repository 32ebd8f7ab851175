# The quick start: `make bench` (install + microbenchmarks), `make test` (install + every test).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
RESULTS ?= bench/results

.PHONY: install bench cmake test gpu-check tune

# torch is never left to pip's resolver: an existing torch (e.g. a CUDA build) is kept, and a bare
# machine gets the pinned CPU wheel. Triton 3.6 matches the GPU machines (and its CPU interpreter
# runs the Triton kernels in the tests when there is no GPU). The build runs without isolation (it
# builds against the installed torch), so its own requirements are installed first.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PYTHON) -c "import triton" 2>/dev/null || $(PIP) install triton==3.6.0
	$(PIP) install "setuptools>=70.1" wheel
	$(PIP) install --no-build-isolation -e ".[test,bench]"
	@# Without a GPU the tests run Triton's interpreter, which numpy 2.4 breaks (int() of a 1-element array).
	$(PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || $(PIP) install "numpy<2.4"

# Results go to build/bench-results/ (untracked); `musetalk-fast-bench --out bench/results` refreshes
# the committed ones on purpose.
bench: install
	$(PYTHON) -m musetalk_fast.bench.run

# The pointer-level kernels without torch: CPU math checked by ctest, .cu files compiled by nvcc.
cmake:
	@if command -v cmake >/dev/null; then \
		cmake -S . -B build/cmake && cmake --build build/cmake -j 2 && ctest --test-dir build/cmake --output-on-failure; \
	else echo "cmake not found: skipping the torch-free kernel build"; fi

test: install cmake
	$(PYTHON) -m pytest tests -q

# The one verification command on a GPU machine that already has torch, Triton and pytest (e.g. an
# offline one): build, every test on the GPU, every benchmark, then a summary printed last and
# written to $(RESULTS)/<gpu>-gpu-check.txt beside <gpu>.json/.png.
gpu-check:
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PYTHON) -m musetalk_fast.bench.gpu_check --results $(RESULTS)

# Regenerate this GPU's launch-config table (kernels/configs/<gpu>.json) by tuning at the benchmark shapes.
tune:
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PYTHON) -m musetalk_fast.bench.tune

# The quick start: `make bench` (install + microbenchmarks), `make test` (install + every test).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
RESULTS ?= bench/results

.PHONY: install bench cmake test gpu-check gpu-wheels tune gpu-train gpu-sanitize

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
# Wheels in .whl/ (from `make gpu-wheels` on a machine with internet) are installed first, without an index.
gpu-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then $(PIP) install -q --no-index --no-deps --no-compile .whl/*.whl; fi
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PYTHON) -m musetalk_fast.bench.gpu_check --results $(RESULTS)

# The model's runtime packages an offline GPU machine lacks (its image has torch, numpy, scipy, OpenCV,
# numba, scikit-learn, huggingface-hub, safetensors, transformers, tqdm, matplotlib; not these), as
# CPython 3.12 manylinux wheels in .whl/ to carry there: diffusers and librosa with their missing needs,
# and imageio-ffmpeg (the ffmpeg binary of video I/O; 0.6.0: 29 MB where 0.8.1 is 68, past what a run carries).
GPU_WHEELS = diffusers==0.42.1 importlib-metadata==10.2.0 librosa==0.11.0 audioread==3.1.0 decorator==5.3.1 \
	soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 pooch==1.9.0 platformdirs==4.14.7 soxr==1.1.0 imageio-ffmpeg==0.6.0
gpu-wheels:
	$(PIP) download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $(GPU_WHEELS)

# Regenerate this GPU's launch-config table (kernels/configs/<gpu>.json) by tuning at the benchmark shapes,
# rewritten after each case. OPS="gated_attention sinkhorn": only those; SECONDS=480: start no case after that.
tune:
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PYTHON) -m musetalk_fast.bench.tune $(if $(OPS),--ops $(OPS)) $(if $(SECONDS),--seconds $(SECONDS))

# Issue 14's training goal on this machine's GPU: data, VAE, SyncNet, then both stages from scratch with the
# pMF objective and with the MuseTalk-1.5 comparison objective, timed and evaluated
# ($(RESULTS)/train/<gpu>-goal.json and a report PNG per run; docs/train.md). VGG=vgg16.pth: LPIPS in both.
# RUNS=pmf or RUNS=l1: one of the two runs (two shorter commands where a command's time is capped; the JSON keeps both).
gpu-train:
	@if ls .whl/*.whl >/dev/null 2>&1; then $(PIP) install -q --no-index --no-deps --no-compile .whl/*.whl; fi
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PYTHON) -m musetalk_fast.bench.train_goal --results $(RESULTS) $(if $(VGG),--perceptual-vgg $(VGG)) \
		$(if $(RUNS),--runs $(RUNS))

# compute-sanitizer memcheck (caching allocator off) over the tests of the kernels that read at data-dependent
# addresses: sparse attention, top-k, lightning indexer, Engram gather, gated attention varlen
# ($(RESULTS)/<gpu>-memcheck.txt; bench/sanitize.py).
gpu-sanitize:
	@if ls .whl/*.whl >/dev/null 2>&1; then $(PIP) install -q --no-index --no-deps --no-compile .whl/*.whl; fi
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PYTHON) -m musetalk_fast.bench.sanitize --results $(RESULTS)

"""Build musetalk_fast: a CPU extension always, a CUDA extension too when torch has CUDA and nvcc exists.

    pip install --no-build-isolation .        # or -e . for development

Environment:
    MUSETALK_FAST_CPU_ONLY=1     build the CPU extension even with a CUDA torch
    TORCH_CUDA_ARCH_LIST         CUDA targets (default "8.0+PTX;9.0a": the H100's sm_90a plus portable PTX)
"""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # pragma: no cover - only hit with build isolation
    raise SystemExit(
        "musetalk_fast builds against the installed torch: install torch first, then "
        "`pip install --no-build-isolation .`"
    ) from error


def csrc(pattern):
    return sorted(glob.glob(os.path.join("csrc", pattern)))


def want_cuda():
    if os.environ.get("MUSETALK_FAST_CPU_ONLY") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


cxx_flags = ["-O3"]
include_dirs = [os.path.abspath("csrc")]
sources = ["csrc/registration.cpp"] + csrc("*/cpu.cpp")
if want_cuda():
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")
    sources += csrc("*/cuda.cu") + csrc("*/cuda_glue.cpp")
    extension = CUDAExtension(
        "musetalk_fast._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("MUSETALK_FAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
    )
else:
    extension = CppExtension("musetalk_fast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags})

setup(
    name="musetalk_fast",
    version="0.1.0",
    description="Triton and CUDA kernels for gated/sparse attention, mHC and Engram, as torch.ops.musetalk_fast",
    python_requires=">=3.10",
    # kernels/ and bench/ live at the top of the repository (see STYLE.md) and install as
    # musetalk_fast.kernels and musetalk_fast.bench.
    packages=[
        "musetalk_fast",
        "musetalk_fast.ops",
        "musetalk_fast.nn",
        "musetalk_fast.kernels",
        "musetalk_fast.bench",
        "musetalk_fast.bench.ops",
    ],
    package_dir={
        "musetalk_fast.kernels": "kernels",
        "musetalk_fast.bench": "bench",
        "musetalk_fast.bench.ops": "bench/ops",
    },
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    # torch is not listed: a torch requirement would let pip resolve (and download) one of its own.
    install_requires=["triton>=3.2; platform_system == 'Linux'"],
    extras_require={
        "test": ["pytest>=7"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["musetalk-fast-bench = musetalk_fast.bench.run:main"]},
)

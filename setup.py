"""Build musetalk_fast: a CPU extension always, a CUDA extension too when torch has CUDA and nvcc exists.

    pip install --no-build-isolation .        # or -e . for development

Environment:
    MUSETALK_FAST_CPU_ONLY=1     build the CPU extension even with a CUDA torch
    TORCH_CUDA_ARCH_LIST         CUDA targets (default "8.0+PTX;9.0a": the H100's sm_90a plus portable PTX)
    CUDA_HOME                    the CUDA toolkit (default: found from nvcc, wrapper scripts included)

After the build, the extension's libstdc++ linkage is checked (musetalk_fast/linkage.py): the build
fails if it carries a static copy of libstdc++ beside torch's shared one.
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess

from setuptools import setup


def _load_linkage():
    """musetalk_fast/linkage.py, loaded by path: the package itself cannot be imported before its build."""
    spec = importlib.util.spec_from_file_location("_musetalk_fast_linkage", os.path.join("musetalk_fast", "linkage.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _toolkit_has_headers(root):
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The CUDA toolkit root. torch guesses it from the folder of the `nvcc` on the PATH, which is
    wrong when that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc):
    ask nvcc where it really lives (its dry run prints _HERE_=<its bin folder>)."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return os.environ[name]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            dry_run = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                     capture_output=True, text=True, timeout=60)
            here = re.search(r"^#\$ _HERE_=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
            if here:
                candidates.append(os.path.dirname(here.group(1).strip()))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    return next((c for c in candidates if _toolkit_has_headers(c)), None)


_cuda_home = find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # read by torch.utils.cpp_extension when it is imported, below

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


linkage = _load_linkage()


class BuildAndCheckExtension(BuildExtension):
    """torch's build, then the libstdc++ linkage check of every built library (fails the build)."""

    def build_extension(self, ext):
        super().build_extension(ext)
        linkage.check(self.get_ext_fullpath(ext.name))


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
        extra_link_args=linkage.LINK_FLAGS,
    )
else:
    extension = CppExtension("musetalk_fast._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx_flags}, extra_link_args=linkage.LINK_FLAGS)

setup(
    name="musetalk_fast",
    version="0.1.0",
    description="Triton and CUDA kernels for gated/sparse attention, mHC and Engram, as torch.ops.musetalk_fast",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author="The musetalk_fast developers",
    url="https://github.com/musetalk-fast/musetalk_fast",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    # kernels/ and bench/ live at the top of the repository (the layout of the README) and install as
    # musetalk_fast.kernels and musetalk_fast.bench.
    packages=[
        "musetalk_fast",
        "musetalk_fast.ops",
        "musetalk_fast.nn",
        "musetalk_fast.data",
        "musetalk_fast.model",
        "musetalk_fast.train",
        "musetalk_fast.kernels",
        "musetalk_fast.bench",
        "musetalk_fast.bench.ops",
    ],
    package_dir={
        "musetalk_fast.kernels": "kernels",
        "musetalk_fast.bench": "bench",
        "musetalk_fast.bench.ops": "bench/ops",
    },
    package_data={"musetalk_fast.kernels": ["configs/*.json"]},  # the tuned launch configs per GPU
    ext_modules=[extension],
    cmdclass={"build_ext": BuildAndCheckExtension},
    # torch is not listed: a torch requirement would let pip resolve (and download) one of its own.
    # numpy .. tqdm: the synthetic talking-head data (musetalk_fast/data), the default data of every command.
    install_requires=["triton>=3.2; platform_system == 'Linux'", "numpy", "scipy", "opencv-python-headless",
                      "imageio-ffmpeg", "tqdm",
                      "diffusers", "safetensors", "librosa",  # the model's VAE and audio front end
                      "matplotlib"],  # the trainer's report (loss curves PNG)
    extras_require={
        "test": ["pytest>=7"],
        "bench": ["matplotlib"],
        "whisper": ["transformers"],  # the optional whisper-tiny audio encoder (local weights only)
    },
    entry_points={"console_scripts": ["musetalk-fast-bench = musetalk_fast.bench.run:main",
                                      "musetalk-fast = musetalk_fast.cli:main"]},
)

"""The built extension: with a CUDA torch and nvcc it has the CUDA kernels, and it shares the
process's libstdc++ (musetalk_fast/linkage.py): a second, static copy crashed every TORCH_CHECK
message with an integer in it on the H100. The build checks the linkage; so do these tests, on the
extension that was built and on the mechanism itself."""
import os
import shutil
import subprocess

import pytest
import torch

import musetalk_fast  # noqa: F401  (registers the ops)
from musetalk_fast import linkage
from musetalk_fast.ops.library import has_cuda_kernel

SOURCE = '#include <sstream>\n#include <string>\n' \
         'std::string message(long x) { std::ostringstream s; s << "k head dim " << x; return s.str(); }\n'


def test_built_extension_loads_the_shared_libstdcxx():
    assert linkage.problems(linkage.installed_extension()) == []


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_check_catches_a_static_libstdcxx_and_the_link_flag_fixes_it(tmp_path):
    """-static-libstdc++ makes what a toolchain with only libstdc++.a makes; LINK_FLAGS asks for the .so."""
    source = tmp_path / "message.cpp"
    source.write_text(SOURCE)
    static, shared = tmp_path / "static.so", tmp_path / "shared.so"
    subprocess.run(["g++", "-shared", "-fPIC", str(source), "-o", str(static), "-static-libstdc++"], check=True)
    subprocess.run(["g++", "-shared", "-fPIC", str(source), "-o", str(shared), *linkage.LINK_FLAGS], check=True)
    found = linkage.problems(str(static))
    assert len(found) == 2 and "no NEEDED entry" in found[0] and "std::basic_ostream" in found[1]
    with pytest.raises(linkage.LinkageError, match="static.so"):
        linkage.check(str(static))
    assert linkage.problems(str(shared)) == []


@pytest.mark.skipif(torch.version.cuda is None or shutil.which("nvcc") is None
                    or os.environ.get("MUSETALK_FAST_CPU_ONLY") == "1",
                    reason="a CPU-only build: no CUDA torch, or no nvcc to build with")
def test_cuda_torch_with_nvcc_builds_the_cuda_extension():
    """The build found the toolkit (a wrapper-script nvcc included) and compiled the CUDA glue."""
    for name in ("sinkhorn_cudacpp", "sinkhorn_backward_cudacpp", "topk_indices_cudacpp"):
        assert has_cuda_kernel(name), name

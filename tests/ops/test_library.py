"""musetalk_fast/ops/library.py: the CUDA kernels registered from Python run with their tensors' device
current (Triton launches on the current device; checked with a stand-in CUDA tensor and a recording
torch.cuda.device), and has_cuda_kernel tells a registered kernel from a bare schema."""
import contextlib

import torch

import musetalk_fast  # noqa: F401  (registers the ops)
from musetalk_fast.ops import library


class _OnSecondGPU(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (what the guard reads)."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)


def _recording_device(entered):
    @contextlib.contextmanager
    def device(where):
        entered.append(where)
        yield

    return device


def test_kernel_runs_with_its_first_cuda_tensors_device_current(monkeypatch):
    entered, seen = [], []
    monkeypatch.setattr(torch.cuda, "device", _recording_device(entered))
    kernel = library.on_the_tensors_device(lambda *args, **kwargs: seen.append((args, kwargs)) or "out")
    cpu, gpu1 = torch.zeros(2), torch.Tensor._make_subclass(_OnSecondGPU, torch.zeros(2))

    assert kernel(cpu, [cpu, gpu1], 3, flag=True) == "out"  # a pinned host table first, a list holding it
    assert entered == [torch.device("cuda", 1)]
    assert seen[0][0][1][1] is gpu1 and seen[0][1] == {"flag": True}  # the arguments are handed over unchanged


def test_kernel_without_cuda_tensors_runs_without_a_device_switch(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", _recording_device(entered))
    kernel = library.on_the_tensors_device(lambda x, k: x.sum() * k)
    assert kernel(torch.ones(3), 2).item() == 6.0
    assert entered == []


def test_has_cuda_kernel_tells_a_registered_kernel_from_a_bare_schema():
    """Every schema exists in every build (hasattr is always true); the Triton launchers are registered
    for CUDA in every build, the CUDA C++ candidates only where nvcc compiled them (test_build.py)."""
    assert hasattr(torch.ops.musetalk_fast, "sinkhorn_cudacpp")
    assert library.has_cuda_kernel("sinkhorn") and library.has_cuda_kernel("engram_lookup")
    if torch.version.cuda is None:  # a CPU torch builds no CUDA extension
        assert not library.has_cuda_kernel("sinkhorn_cudacpp") and not library.has_cuda_kernel("topk_indices_cudacpp")

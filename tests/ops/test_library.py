"""The CUDA kernels registered from Python run with their tensors' device current (Triton launches on
the current device): checked here with a stand-in CUDA tensor and a recording torch.cuda.device."""
import contextlib

import torch

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

"""Argument checks shared by the fake impls and the Triton paths; each error names the argument."""
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(t, name, dtypes=FLOAT_DTYPES):
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be one of {names}, got {t.dtype}")


def check_rank(t, rank, name):
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {list(t.shape)}")


def check_same(t, ref, name, ref_name):
    """t has ref's dtype and device."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def check_triton_dtype(t, name):
    """Triton kernels take half, bfloat16 and float32; float64 runs on the CPU kernels."""
    if t.is_cuda and t.dtype == torch.float64:
        raise TypeError(f"{name}: float64 is supported on the CPU only (for gradcheck), got a CUDA float64 tensor")

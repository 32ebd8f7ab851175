"""sinkhorn: doubly-stochastic projection of [..., n, n] logits (docs/ops.md §5).

CPU: csrc/sinkhorn/cpu.cpp. CUDA: the Triton kernels of kernels/sinkhorn.py (a CUDA C++ candidate,
sinkhorn_cudacpp, is built beside it for the benchmark). Backward: a kernel, which on the GPU
recomputes the iterations on-chip and on the CPU stores each step's input.
"""
import torch

from .backend import routable
from .checks import check_float
from .library import op, qualname, register_cuda

MAX_N = 16  # csrc/sinkhorn/sinkhorn_math.h kMaxN


def check_args(logits, iters, eps):
    check_float(logits, "logits")
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits must have shape [..., n, n], got {list(logits.shape)}")
    if logits.shape[-1] > MAX_N:
        raise ValueError(f"logits: n must be at most {MAX_N}, got {logits.shape[-1]}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps:g}")  # :g prints a double as C++'s ostream does


def check_backward_args(grad, logits, iters, eps):
    check_args(logits, iters, eps)
    check_float(grad, "grad")
    if grad.shape != logits.shape:
        raise ValueError(f"grad must have the shape of logits {list(logits.shape)}, got {list(grad.shape)}")


@torch.library.register_fake(qualname("sinkhorn"))
def _sinkhorn_fake(logits, iters=20, eps=1e-6):
    check_args(logits, iters, eps)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake(qualname("sinkhorn_backward"))
def _sinkhorn_backward_fake(grad, logits, iters, eps):
    check_backward_args(grad, logits, iters, eps)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _sinkhorn_cuda(logits, iters=20, eps=1e-6):
    check_args(logits, iters, eps)
    from ..kernels.sinkhorn import sinkhorn_forward

    return sinkhorn_forward(logits, iters, eps)


def _sinkhorn_backward_cuda(grad, logits, iters, eps):
    check_backward_args(grad, logits, iters, eps)
    from ..kernels.sinkhorn import sinkhorn_backward

    return sinkhorn_backward(grad, logits, iters, eps)


register_cuda("sinkhorn", _sinkhorn_cuda)
register_cuda("sinkhorn_backward", _sinkhorn_backward_cuda)


def _setup_context(ctx, inputs, output):
    logits, iters, eps = inputs
    ctx.save_for_backward(logits)
    ctx.iters, ctx.eps = iters, eps


def _backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return op("sinkhorn_backward")(grad, logits, ctx.iters, ctx.eps), None, None


torch.library.register_autograd(qualname("sinkhorn"), _backward, setup_context=_setup_context)


@routable("sinkhorn")
def sinkhorn(logits, iters=20, eps=1e-6):
    """Doubly-stochastic P from logits [..., n, n]: exp(logits - max), then `iters` rounds of
    column then row normalisation (DeepSeek mHC). Differentiable."""
    return op("sinkhorn")(logits, iters, eps)

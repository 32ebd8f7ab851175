"""gated_attention: SDPA(q, k, v) * sigmoid(gate), the gate fused in the epilogue (docs/ops.md §4).

The public op is composite over `gated_attention_forward` -> (out, lse), which carries the
autograd, and `gated_attention_backward`. CPU: csrc/gated_attention/cpu.cpp. CUDA: the Triton
kernels of kernels/gated_attention.py.
"""
import torch

from .checks import check_float, check_rank, check_same
from .library import op, qualname, register_composite, register_cuda


def check_args(q, k, v, gate):
    """Shapes: q [B, Hq, L, D], k and v [B, Hkv, S, D], gate [B, Hq, L, D] or [B, Hq, L, 1]."""
    check_float(q, "q")
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (gate, "gate")):
        check_rank(t, 4, name)
    for t, name in ((k, "k"), (v, "v"), (gate, "gate")):
        check_same(t, q, name, "q")
    batch, q_heads, q_len, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k batch {k.shape[0]} must equal q batch {batch}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k head dim {k.shape[3]} must equal q head dim {head_dim}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {list(k.shape)}, got {list(v.shape)}")
    kv_heads = k.shape[1]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of k/v heads ({kv_heads})")
    if gate.shape != q.shape and tuple(gate.shape) != (batch, q_heads, q_len, 1):
        raise ValueError(f"gate must have shape {list(q.shape)} or [B, Hq, L, 1], got {list(gate.shape)}")


def check_backward_args(grad_out, q, k, v, gate, out, lse):
    check_args(q, k, v, gate)
    for t, name in ((grad_out, "grad_out"), (out, "out")):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {list(q.shape)}, got {list(t.shape)}")
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must have shape [B, Hq, L] = {list(q.shape[:3])}, got {list(lse.shape)}")


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake(qualname("gated_attention_forward"))
def _forward_fake(q, k, v, gate, is_causal, scale):
    check_args(q, k, v, gate)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


@torch.library.register_fake(qualname("gated_attention_backward"))
def _backward_fake(grad_out, q, k, v, gate, out, lse, is_causal, scale):
    check_backward_args(grad_out, q, k, v, gate, out, lse)
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v, gate))


def _forward_cuda(q, k, v, gate, is_causal, scale):
    check_args(q, k, v, gate)
    from ..kernels.gated_attention import gated_attention_forward

    return gated_attention_forward(q, k, v, gate, is_causal, scale)


def _backward_cuda(grad_out, q, k, v, gate, out, lse, is_causal, scale):
    check_backward_args(grad_out, q, k, v, gate, out, lse)
    from ..kernels.gated_attention import gated_attention_backward

    return gated_attention_backward(grad_out, q, k, v, gate, out, lse, is_causal, scale)


register_cuda("gated_attention_forward", _forward_cuda)
register_cuda("gated_attention_backward", _backward_cuda)


def _composite(q, k, v, gate, is_causal=False, scale=None):
    return op("gated_attention_forward")(q, k, v, gate, is_causal, scale)[0]


register_composite("gated_attention", _composite)


def _setup_context(ctx, inputs, output):
    q, k, v, gate, is_causal, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # lse is saved for the backward, not a differentiable output
    ctx.save_for_backward(q, k, v, gate, out, lse)
    ctx.is_causal, ctx.scale = is_causal, scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, gate, out, lse = ctx.saved_tensors
    dq, dk, dv, dgate = op("gated_attention_backward")(grad_out, q, k, v, gate, out, lse, ctx.is_causal, ctx.scale)
    return dq, dk, dv, dgate, None, None


torch.library.register_autograd(qualname("gated_attention_forward"), _backward, setup_context=_setup_context)


def gated_attention(q, k, v, gate, is_causal=False, scale=None):
    """scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale) * sigmoid(gate).

    q, gate: [B, Hq, L, D] (gate may be [B, Hq, L, 1]); k, v: [B, Hkv, S, D] with Hq % Hkv == 0.
    Causal masking is top-left aligned, as torch's SDPA. Differentiable in q, k, v and gate.
    """
    return op("gated_attention")(q, k, v, gate, is_causal, scale)

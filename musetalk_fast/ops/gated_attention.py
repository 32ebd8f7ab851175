"""gated_attention: SDPA(q, k, v) * sigmoid(gate), the gate fused in the epilogue (docs/ops.md §4).

The public op is composite over `gated_attention_forward` -> (out, lse), which carries the
autograd, and `gated_attention_backward`; `gated_attention_varlen` likewise over packed
sequences. CPU: csrc/gated_attention/cpu.cpp (varlen: that kernel called once per sequence).
CUDA: the Triton kernels of kernels/gated_attention.py. The CUDA backward adds dQ with fp32
atomics unless deterministic mode is on (`set_gated_attention_deterministic(True)` or
`torch.use_deterministic_algorithms(True)`).
"""
import torch

from .backend import routable
from .checks import check_dtype, check_device, check_float, check_rank, check_same, has_data
from .library import LIB, op, qualname, register_composite, register_cuda

_deterministic = False


def set_gated_attention_deterministic(enabled=True):
    """Deterministic mode for the CUDA backward of gated_attention(_varlen): dQ from a separate
    kernel that sums the key blocks in a fixed order (2 more matmuls per block, no fp32 dQ buffer)
    instead of fp32 atomic adds, so repeated runs give bitwise-equal gradients.
    torch.use_deterministic_algorithms(True) turns it on too. Returns the previous setting."""
    global _deterministic
    previous, _deterministic = _deterministic, bool(enabled)
    return previous


def deterministic_backward():
    """Whether the backward runs in deterministic mode (read when the backward runs)."""
    return _deterministic or torch.are_deterministic_algorithms_enabled()


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

    return gated_attention_backward(grad_out, q, k, v, gate, out, lse, is_causal, scale, deterministic_backward())


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


@routable("gated_attention")
def gated_attention(q, k, v, gate, is_causal=False, scale=None):
    """scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale) * sigmoid(gate).

    q, gate: [B, Hq, L, D] (gate may be [B, Hq, L, 1]); k, v: [B, Hkv, S, D] with Hq % Hkv == 0.
    Causal masking is top-left aligned, as torch's SDPA. Differentiable in q, k, v and gate.
    """
    return op("gated_attention")(q, k, v, gate, is_causal, scale)


# Varlen: packed [T, H, D] sequences, sequence b at rows cu_seqlens[b]:cu_seqlens[b + 1] ------------


def check_varlen_args(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Shapes: q [Tq, Hq, D], k and v [Tk, Hkv, D], gate [Tq, Hq, D] or [Tq, Hq, 1]; cu_seqlens int32
    [B + 1], from 0 up to T, non-decreasing; max_seqlen >= every sequence's length."""
    check_float(q, "q")
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (gate, "gate")):
        check_rank(t, 3, name)
    for t, name in ((k, "k"), (v, "v"), (gate, "gate")):
        check_same(t, q, name, "q")
    total_q, q_heads, head_dim = q.shape
    if k.shape[2] != head_dim:
        raise ValueError(f"k head dim {k.shape[2]} must equal q head dim {head_dim}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {list(k.shape)}, got {list(v.shape)}")
    kv_heads = k.shape[1]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of k/v heads ({kv_heads})")
    if gate.shape != q.shape and tuple(gate.shape) != (total_q, q_heads, 1):
        raise ValueError(f"gate must have shape {list(q.shape)} or [Tq, Hq, 1], got {list(gate.shape)}")
    sequences = ((cu_seqlens_q, "cu_seqlens_q", total_q, max_seqlen_q, "max_seqlen_q"),
                 (cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k"))
    for cu, name, _, max_len, max_name in sequences:
        check_dtype(cu, name, (torch.int32,))
        check_rank(cu, 1, name)
        check_device(cu, q, name, "q")
        if cu.shape[0] < 1:
            raise ValueError(f"{name} must have B + 1 >= 1 entries, got shape {list(cu.shape)}")
        if max_len < 0:
            raise ValueError(f"{max_name} must be >= 0, got {max_len}")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k must have cu_seqlens_q's shape {list(cu_seqlens_q.shape)}, "
                         f"got {list(cu_seqlens_k.shape)}")
    if not has_data(cu_seqlens_q, cu_seqlens_k):  # value checks only on real tensors (not under torch.compile)
        return
    # (first, last, shortest, longest) of both, read in one device sync: on a GPU each .item() would stall the
    # launch queue, and these checks run before every varlen forward and backward
    def ends_and_lengths(cu):
        lengths = cu.diff() if cu.shape[0] > 1 else cu[:1] * 0
        return torch.stack([cu[0], cu[-1], lengths.min(), lengths.max()])

    values = torch.stack([ends_and_lengths(cu_seqlens_q), ends_and_lengths(cu_seqlens_k)]).tolist()
    for (cu, name, total, max_len, max_name), (first, last, shortest, longest) in zip(sequences, values):
        if first != 0 or last != total:
            raise ValueError(f"{name} must run from 0 to {total} (the packed length), got {first} ... {last}")
        if cu.shape[0] > 1 and shortest < 0:
            raise ValueError(f"{name} must be non-decreasing")
        if cu.shape[0] > 1 and longest > max_len:
            raise ValueError(f"{max_name} ({max_len}) must be >= the longest sequence ({longest})")


def check_varlen_backward_args(grad_out, q, k, v, gate, out, lse, *varlen):
    check_varlen_args(q, k, v, gate, *varlen)
    for t, name in ((grad_out, "grad_out"), (out, "out")):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {list(q.shape)}, got {list(t.shape)}")
    if lse.shape != (q.shape[1], q.shape[0]):
        raise ValueError(f"lse must have shape [Hq, Tq] = {[q.shape[1], q.shape[0]]}, got {list(lse.shape)}")


@torch.library.register_fake(qualname("gated_attention_varlen_forward"))
def _varlen_forward_fake(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale):
    check_varlen_args(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), lse


@torch.library.register_fake(qualname("gated_attention_varlen_backward"))
def _varlen_backward_fake(grad_out, q, k, v, gate, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          is_causal, scale):
    check_varlen_backward_args(grad_out, q, k, v, gate, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k)
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v, gate))


def _sequences(cu_seqlens_q, cu_seqlens_k):
    """(q rows, k rows) slices of each sequence."""
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(slice(bounds_q[b], bounds_q[b + 1]), slice(bounds_k[b], bounds_k[b + 1]))
            for b in range(len(bounds_q) - 1)]


def _as_batch(t):
    """One packed sequence [n, H, D] as a [1, H, n, D] view."""
    return t.unsqueeze(0).transpose(1, 2)


def _varlen_forward_cpu(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale):
    """The CPU C++ kernel of gated_attention_forward, once per sequence."""
    check_varlen_args(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))
    for rows_q, rows_k in _sequences(cu_seqlens_q, cu_seqlens_k):
        o, l = op("gated_attention_forward")(*(_as_batch(t[rows]) for t, rows in
                                               ((q, rows_q), (k, rows_k), (v, rows_k), (gate, rows_q))),
                                             is_causal, scale)
        out[rows_q] = o[0].transpose(0, 1)
        lse[:, rows_q] = l[0]
    return out, lse


def _varlen_backward_cpu(grad_out, q, k, v, gate, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         is_causal, scale):
    check_varlen_backward_args(grad_out, q, k, v, gate, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k)
    grads = [torch.zeros(t.shape, dtype=t.dtype) for t in (q, k, v, gate)]  # rows of no sequence get 0
    for rows_q, rows_k in _sequences(cu_seqlens_q, cu_seqlens_k):
        tensors = [(grad_out, rows_q), (q, rows_q), (k, rows_k), (v, rows_k), (gate, rows_q), (out, rows_q)]
        parts = op("gated_attention_backward")(*(_as_batch(t[rows]) for t, rows in tensors),
                                                lse[:, rows_q].unsqueeze(0), is_causal, scale)
        for grad, part, rows in zip(grads, parts, (rows_q, rows_k, rows_k, rows_q)):
            grad[rows] = part[0].transpose(0, 1)
    return tuple(grads)


def _varlen_forward_cuda(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale):
    check_varlen_args(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    from ..kernels.gated_attention import gated_attention_varlen_forward

    return gated_attention_varlen_forward(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          is_causal, scale)


def _varlen_backward_cuda(grad_out, q, k, v, gate, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          is_causal, scale):
    varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_varlen_backward_args(grad_out, q, k, v, gate, out, lse, *varlen)
    from ..kernels.gated_attention import gated_attention_varlen_backward

    return gated_attention_varlen_backward(grad_out, q, k, v, gate, out, lse, *varlen, is_causal, scale,
                                           deterministic_backward())


LIB.impl("gated_attention_varlen_forward", _varlen_forward_cpu, "CPU")
LIB.impl("gated_attention_varlen_backward", _varlen_backward_cpu, "CPU")
register_cuda("gated_attention_varlen_forward", _varlen_forward_cuda)
register_cuda("gated_attention_varlen_backward", _varlen_backward_cuda)


def _varlen_composite(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal=False,
                      scale=None):
    return op("gated_attention_varlen_forward")(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                max_seqlen_k, is_causal, scale)[0]


register_composite("gated_attention_varlen", _varlen_composite)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, gate, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.max_seqlens, ctx.is_causal, ctx.scale = (max_seqlen_q, max_seqlen_k), is_causal, scale


def _varlen_backward(ctx, grad_out, _grad_lse):
    q, k, v, gate, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    grads = op("gated_attention_varlen_backward")(grad_out, q, k, v, gate, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                  *ctx.max_seqlens, ctx.is_causal, ctx.scale)
    return (*grads, None, None, None, None, None, None)


torch.library.register_autograd(qualname("gated_attention_varlen_forward"), _varlen_backward,
                                setup_context=_varlen_setup_context)


@routable("gated_attention_varlen")
def gated_attention_varlen(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal=False,
                           scale=None):
    """gated_attention over packed sequences, as flash_attn_varlen_func (dropout_p = 0 only).

    q, gate: [Tq, Hq, D] (gate may be [Tq, Hq, 1]); k, v: [Tk, Hkv, D]; sequence b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k, v
    (int32, from 0 to T); max_seqlen_q/k bound the lengths. Causal is top-left aligned within each
    sequence, as gated_attention (flash-attn aligns bottom-right when the lengths differ).
    Returns [Tq, Hq, D]. Differentiable in q, k, v and gate.
    """
    return op("gated_attention_varlen")(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        is_causal, scale)

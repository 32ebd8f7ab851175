"""sparse_attention: attention over the keys each query's indexer selected (docs/ops.md §3).

The op returns (out, lse) and carries its autograd: the backward op `sparse_attention_backward` takes the
gradients of both outputs (d lse / d score = P, so a finite lse is differentiable at no extra pass).
CPU: csrc/sparse_attention/cpu.cpp (deterministic). CUDA: the Triton kernels of
kernels/sparse_attention.py (dk/dv by fp32 atomics, or a deterministic sorted segment sum when
torch.are_deterministic_algorithms_enabled()).
"""
import torch

from .backend import routable
from .checks import check_device, check_dtype, check_float, check_rank, check_same, check_shape
from .library import op, qualname, register_cuda

INT32 = (torch.int32,)


def check_sparse_attention(q, k, v, indices, sm_scale=None):
    """The same checks, in the same order and words, as csrc/sparse_attention/cpu.cpp check_args."""
    check_float(q, "q")
    check_rank(q, 3, "q")
    check_rank(k, 3, "k")
    check_same(k, q, "k", "q")
    check_same(v, q, "v", "q")
    check_dtype(indices, "indices", INT32)
    check_device(indices, q, "indices", "q")
    num_tokens, q_heads, head_dim = q.shape
    num_keys, kv_heads, _ = k.shape
    if k.shape[2] != head_dim:
        raise ValueError(f"k head dim {k.shape[2]} must equal q head dim {head_dim}")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of k/v heads ({kv_heads})")
    check_shape(v, "v", "S, Hkv, Dv", [num_keys, kv_heads, None])
    check_shape(indices, "indices", "T, Hkv, K", [num_tokens, kv_heads, None])


def check_backward(grad_out, grad_lse, q, k, v, indices, out, lse, sm_scale=None):
    check_sparse_attention(q, k, v, indices)
    out_shape, lse_shape = [q.shape[0], q.shape[1], v.shape[2]], [q.shape[0], q.shape[1]]
    for t, name, dims, want in ((grad_out, "grad_out", "T, Hq, Dv", out_shape), (out, "out", "T, Hq, Dv", out_shape),
                                (grad_lse, "grad_lse", "T, Hq", lse_shape), (lse, "lse", "T, Hq", lse_shape)):
        check_shape(t, name, dims, want)


def lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake(qualname("sparse_attention"))
def _forward_fake(q, k, v, indices, sm_scale=None):
    check_sparse_attention(q, k, v, indices)
    return (q.new_empty((q.shape[0], q.shape[1], v.shape[2])), q.new_empty(q.shape[:2], dtype=lse_dtype(q)))


@torch.library.register_fake(qualname("sparse_attention_backward"))
def _backward_fake(grad_out, grad_lse, q, k, v, indices, out, lse, sm_scale):
    check_backward(grad_out, grad_lse, q, k, v, indices, out, lse)
    return tuple(t.new_empty(t.shape) for t in (q, k, v))


def _forward_cuda(q, k, v, indices, sm_scale=None):
    check_sparse_attention(q, k, v, indices)
    from ..kernels.sparse_attention import sparse_attention_forward

    return sparse_attention_forward(q, k, v, indices, sm_scale)


def _backward_cuda(grad_out, grad_lse, q, k, v, indices, out, lse, sm_scale):
    check_backward(grad_out, grad_lse, q, k, v, indices, out, lse)
    from ..kernels.sparse_attention import sparse_attention_backward

    return sparse_attention_backward(grad_out, grad_lse, q, k, v, indices, out, lse, sm_scale,
                                     deterministic=torch.are_deterministic_algorithms_enabled())


register_cuda("sparse_attention", _forward_cuda)
register_cuda("sparse_attention_backward", _backward_cuda)


def _setup_context(ctx, inputs, output):
    q, k, v, indices, sm_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, indices, out, lse)
    ctx.sm_scale = sm_scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, indices, out, lse = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    dq, dk, dv = op("sparse_attention_backward")(grad_out, grad_lse, q, k, v, indices, out, lse, ctx.sm_scale)
    return dq, dk, dv, None, None


torch.library.register_autograd(qualname("sparse_attention"), _backward, setup_context=_setup_context)


@routable("sparse_attention")
def sparse_attention(q, k, v, indices, sm_scale=None):
    """Top-k sparse attention: each query head attends only to the keys indices[t, g] of its KV head g.

    q: [T, Hq, Dqk]; k: [S, Hkv, Dqk]; v: [S, Hkv, Dv] (Dv may differ from Dqk); q, k and v share one
    dtype (float16, bfloat16, float32 or float64) and device; Hq % Hkv == 0 (query head h reads KV head
    h // (Hq // Hkv)). indices: [T, Hkv, K] int32; an index outside [0, S) means "no key" (the -1
    padding of topk_indices). sm_scale defaults to Dqk ** -0.5. Returns (out, lse): out [T, Hq, Dv] in
    q's dtype, 0 for a row with no key; lse [T, Hq] float32 (float64 for float64 inputs), the
    log-sum-exp of the scaled scores, -inf for a row with no key. Differentiable in q, k and v, through
    out and through the finite entries of lse (a backward kernel).
    """
    return op("sparse_attention")(q, k, v, indices, sm_scale)

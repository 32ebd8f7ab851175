"""lightning_indexer and fp8_quantize: DeepSeek Sparse Attention's FP8 indexer logits (docs/ops.md §1).

CPU: csrc/lightning_indexer/cpu.cpp. CUDA: the Triton kernels of kernels/lightning_indexer.py (fp8 q and
k on tensor cores, fp32 accumulation). Backward (dq, dk, dk_scale, dweights): a kernel on both devices,
for floating (not fp8) inputs; fp8 inputs get no gradient.
"""
import torch

from .backend import routable
from .checks import FLOAT_DTYPES, check_device, check_dtype, check_float, check_rank, check_shape, has_data
from .library import op, qualname, register_cuda

FP8_OR_FLOAT = (torch.float8_e4m3fn, *FLOAT_DTYPES)
FP32_OR_FP64 = (torch.float32, torch.float64)
INT32 = (torch.int32,)
MAX_HEADS = 128  # csrc/lightning_indexer/cpu.cpp kMaxHeads
HEAD_DIMS = (32, 64, 128)


def check_key_range(ks, ke, num_tokens, num_keys, ref, ref_name):
    """ks, ke: [T] int32 on ref's device, either may be None (topk_indices' optional range); their values,
    when they can be read (checks.has_data): 0 <= ks <= ke <= S, as the kernels read them."""
    for t, name in ((ks, "ks"), (ke, "ke")):
        if t is not None:
            check_dtype(t, name, INT32)
            check_shape(t, name, "T", [num_tokens])
            check_device(t, ref, name, ref_name)
    present = [t for t in (ks, ke) if t is not None]
    if num_tokens == 0 or not present or not has_data(*present):
        return
    start = ks.long().cpu() if ks is not None else torch.zeros(num_tokens, dtype=torch.long)
    end = ke.long().cpu() if ke is not None else torch.full((num_tokens,), num_keys, dtype=torch.long)
    # The first bad row, and its first failing check: what the C++ checks, walking the rows, report.
    bad_rows = ((start < 0) | (start > end) | (end > num_keys)).nonzero()
    if len(bad_rows):
        t = int(bad_rows[0])
        first, last = int(start[t]), int(end[t])
        if first < 0:
            raise ValueError(f"ks must be >= 0, got ks[{t}] = {first}")
        if first > last:
            raise ValueError(f"ks must be <= ke, got ks[{t}] = {first} > ke[{t}] = {last}")
        raise ValueError(f"ke must be <= S = {num_keys}, got ke[{t}] = {last}")


def check_lightning_indexer(q, k, k_scale, weights, ks, ke):
    check_dtype(q, "q", FP8_OR_FLOAT)
    check_dtype(k, "k", FP8_OR_FLOAT)
    check_dtype(k_scale, "k_scale", FP32_OR_FP64)
    check_dtype(weights, "weights", FP32_OR_FP64)
    check_rank(q, 3, "q")
    check_rank(k, 2, "k")
    for t, name in ((k, "k"), (k_scale, "k_scale"), (weights, "weights")):
        check_device(t, q, name, "q")
    num_tokens, heads, head_dim = q.shape
    if not 1 <= heads <= MAX_HEADS:
        raise ValueError(f"q heads must be between 1 and {MAX_HEADS}, got {heads}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"q head dim must be 32, 64 or 128, got {head_dim}")
    if k.shape[1] != head_dim:
        raise ValueError(f"k head dim {k.shape[1]} must equal q head dim {head_dim}")
    check_shape(k_scale, "k_scale", "S", [k.shape[0]])
    check_shape(weights, "weights", "T, H", [num_tokens, heads])
    check_key_range(ks, ke, num_tokens, k.shape[0], q, "q")


def check_lightning_indexer_backward(grad, q, k, k_scale, weights, ks, ke):
    check_lightning_indexer(q, k, k_scale, weights, ks, ke)
    check_float(grad, "grad")
    check_shape(grad, "grad", "T, S", [q.shape[0], k.shape[0]])


def check_fp8_quantize(x, block=None, ue8m0=False):
    check_float(x, "x")
    if x.dim() < 1:
        raise ValueError(f"x must have rank >= 1, got shape {list(x.shape)}")
    dim = x.shape[-1]
    if block is None:
        if dim == 0:
            raise ValueError(f"x's last dim must be > 0 when block is None (one block per row), "
                             f"got shape {list(x.shape)}")
    elif block <= 0:
        raise ValueError(f"block must be > 0, got {block}")
    elif dim % block != 0:
        raise ValueError(f"block {block} must divide x's last dim {dim}")


def compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.library.register_fake(qualname("lightning_indexer"))
def _lightning_indexer_fake(q, k, k_scale, weights, ks, ke):
    check_lightning_indexer(q, k, k_scale, weights, ks, ke)
    return q.new_empty((q.shape[0], k.shape[0]), dtype=compute_dtype(q, k, k_scale, weights))


@torch.library.register_fake(qualname("lightning_indexer_backward"))
def _lightning_indexer_backward_fake(grad, q, k, k_scale, weights, ks, ke):
    check_lightning_indexer_backward(grad, q, k, k_scale, weights, ks, ke)
    dtype = compute_dtype(q, k, k_scale, weights)
    return tuple(t.new_empty(t.shape, dtype=dtype) for t in (q, k, k_scale, weights))


@torch.library.register_fake(qualname("fp8_quantize"))
def _fp8_quantize_fake(x, block=None, ue8m0=False):
    check_fp8_quantize(x, block, ue8m0)
    dim = x.shape[-1]
    scale_shape = x.shape[:-1] if block is None or block == dim else (*x.shape[:-1], dim // block)
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(scale_shape, dtype=torch.float32)


def _lightning_indexer_cuda(q, k, k_scale, weights, ks, ke):
    check_lightning_indexer(q, k, k_scale, weights, ks, ke)
    from ..kernels.lightning_indexer import lightning_indexer_forward

    return lightning_indexer_forward(q, k, k_scale, weights, ks, ke)


def _lightning_indexer_backward_cuda(grad, q, k, k_scale, weights, ks, ke):
    check_lightning_indexer_backward(grad, q, k, k_scale, weights, ks, ke)
    from ..kernels.lightning_indexer import lightning_indexer_backward

    return lightning_indexer_backward(grad, q, k, k_scale, weights, ks, ke)


def _fp8_quantize_cuda(x, block=None, ue8m0=False):
    check_fp8_quantize(x, block, ue8m0)
    from ..kernels.lightning_indexer import fp8_quantize

    return fp8_quantize(x, block, ue8m0)


register_cuda("lightning_indexer", _lightning_indexer_cuda)
register_cuda("lightning_indexer_backward", _lightning_indexer_backward_cuda)
register_cuda("fp8_quantize", _fp8_quantize_cuda)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    q, k, k_scale, weights, ks, ke = ctx.saved_tensors
    grads = op("lightning_indexer_backward")(grad, q, k, k_scale, weights, ks, ke)
    # fp8 inputs are quantised data, not parameters: no gradient reaches them.
    return (*(None if t.dtype == torch.float8_e4m3fn else g.to(t.dtype)
              for g, t in zip(grads, (q, k, k_scale, weights))), None, None)


torch.library.register_autograd(qualname("lightning_indexer"), _backward, setup_context=_setup_context)


@routable("lightning_indexer")
def lightning_indexer(q, k, k_scale, weights, ks, ke):
    """DeepSeek Sparse Attention's lightning indexer: logits[t, s] = k_scale[s] * sum_h weights[t, h] *
    relu(q[t, h] . k[s]) for ks[t] <= s < ke[t], -inf elsewhere.

    q: [T, H, D] and k: [S, D], each float8_e4m3fn, float16, bfloat16, float32 or float64, 1 <= H <= 128,
    D in {32, 64, 128}; k_scale: [S] and weights: [T, H], float32 or float64; ks, ke: [T] int32 with
    0 <= ks <= ke <= S; all on one device. Returns logits [T, S], float32 (float64 when an input is
    float64). Differentiable in q, k, k_scale and weights when they are not fp8 (a backward kernel);
    masked entries get no gradient.
    """
    return op("lightning_indexer")(q, k, k_scale, weights, ks, ke)


@routable("fp8_quantize")
def fp8_quantize(x, block=None, ue8m0=False):
    """Blockwise float8_e4m3fn quantisation along the last dim: scale = max(amax, 1e-4) / 448 per block.

    x: [..., D], float16, bfloat16, float32 or float64 (quantised from x.float()), rank >= 1; block: values
    per scale, None for the whole row (D), else > 0 and dividing D; ue8m0 rounds each scale up to a power of
    two (DeepSeek V3's UE8M0 scales). Returns (x_fp8, scale): x_fp8 float8_e4m3fn with x's shape,
    x ~ x_fp8 * scale; scale float32 of shape x.shape[:-1] when block is None (or D), else
    x.shape[:-1] + (D // block,). No gradient (a quantiser).
    """
    return op("fp8_quantize")(x, block, ue8m0)

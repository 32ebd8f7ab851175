"""gated_attention vs SDPA + a separate sigmoid gate (cuDNN, FlashAttention-2 backends, flash-attn
if installed), and the cost of the gate itself (ungated cuDNN, our kernel ungated)."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import musetalk_fast
from musetalk_fast.kernels.gated_attention import flops

from ..case import Case

GPU_SHAPES = [(4, 16, 4096, 128, False), (4, 16, 4096, 128, True), (8, 16, 2048, 64, True)]
CPU_SHAPES = [(1, 4, 256, 64, False), (1, 4, 256, 64, True), (1, 8, 1024, 64, True)]


def _sdpa_gated(backend=None):
    """SDPA on `backend` (None: torch's own choice, its fused flash kernel on a CPU) + the gate."""
    def run(q, k, v, gate, is_causal):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal) * torch.sigmoid(gate)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal) * torch.sigmoid(gate)

    return run


def _sdpa_ungated(q, k, v, is_causal):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def _flash_attn_gated():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None

    def run(q, k, v, gate, is_causal):  # flash-attn takes [B, L, H, D]
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=is_causal)
        return out.transpose(1, 2) * torch.sigmoid(gate)

    return run


def _ours(q, k, v, gate, is_causal):
    return musetalk_fast.ops.gated_attention(q, k, v, gate, is_causal=is_causal)


def _fwd_bwd(fn, tensors, is_causal):
    leaves = [t.detach().requires_grad_() for t in tensors]
    grad = torch.randn_like(tensors[0])

    def run():
        for t in leaves:
            t.grad = None
        fn(*leaves, is_causal).backward(grad)

    return run


def cases(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gated = {"cuDNN SDPA + gate": _sdpa_gated(SDPBackend.CUDNN_ATTENTION),
             "FA2 SDPA + gate": _sdpa_gated(SDPBackend.FLASH_ATTENTION)} if device == "cuda" else {
        "SDPA (torch default) + gate": _sdpa_gated(), "SDPA (math) + gate": _sdpa_gated(SDPBackend.MATH)}
    if device == "cuda" and _flash_attn_gated() is not None:
        gated["flash-attn + gate"] = _flash_attn_gated()
    out = []
    for batch, heads, length, head_dim, is_causal in (GPU_SHAPES if device == "cuda" else CPU_SHAPES):
        q, k, v, gate = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype) for _ in range(4))
        shape = f"B{batch} H{heads} L{length} D{head_dim} {'causal' if is_causal else 'full'} {str(dtype)[6:]}"
        fwd_flops = flops(batch, heads, length, length, head_dim, is_causal)
        ours = {"ours": lambda q=q, k=k, v=v, g=gate, c=is_causal: _ours(q, k, v, g, c)}
        notes = {}
        if device == "cuda":
            from musetalk_fast.kernels.gated_attention import gated_attention_forward

            ours["ours ungated"] = lambda q=q, k=k, v=v, c=is_causal: gated_attention_forward(q, k, v, None, c)
            notes["gate cost"] = "ours / ours ungated"
        baselines = {name: (lambda f=f, q=q, k=k, v=v, g=gate, c=is_causal: f(q, k, v, g, c)) for name, f in gated.items()}
        if device == "cuda":  # what the unfused gate costs cuDNN (an "(info)" row: not a gated baseline)
            baselines["cuDNN SDPA ungated (info)"] = lambda q=q, k=k, v=v, c=is_causal: _sdpa_ungated(q, k, v, c)
        out.append(Case("gated_attention fwd", shape, ours, baselines, flops=fwd_flops,
                        roofline="bf16" if device == "cuda" else "fp32", notes=notes))
        out.append(Case("gated_attention fwd+bwd", shape, {"ours": _fwd_bwd(_ours, (q, k, v, gate), is_causal)},
                        {name: _fwd_bwd(f, (q, k, v, gate), is_causal) for name, f in gated.items()},
                        flops=flops(batch, heads, length, length, head_dim, is_causal, backward=True),
                        roofline="bf16" if device == "cuda" else "fp32"))
    return out

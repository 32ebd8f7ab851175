"""topk_indices at k=2048 (DeepSeek Sparse Attention's selection) vs torch.topk, over rows of 8192 to
65536 keys (memory-bound: one read of the logits), the Triton kernel and the CUDA C++ candidate; and the
fused indexer top-k vs indexer-then-top-k (ours, unfused), causal prefill, fp8, including T=S=65536
where the unfused path writes 16 GiB of logits."""
import torch

import musetalk_fast
from musetalk_fast.ops.library import has_cuda_kernel

from ..case import Case
from .lightning_indexer import causal_inputs

TOPK = 2048


def cases(device):
    out = []
    rows, key_counts, k = (4096, [8192, 16384, 32768, 65536], TOPK) if device == "cuda" else (64, [8192], 256)
    for keys in key_counts:
        logits = torch.randn(rows, keys, device=device)
        ours = {"ours": lambda x=logits: musetalk_fast.ops.topk_indices(x, k)}
        if device == "cuda" and has_cuda_kernel("topk_indices_cudacpp"):
            ours["ours (CUDA C++)"] = lambda x=logits: torch.ops.musetalk_fast.topk_indices_cudacpp(x, k)
        out.append(Case("topk_indices", f"T={rows} S={keys} k={k} fp32", ours,
                        {"torch.topk": lambda x=logits: torch.topk(x, k, dim=-1, sorted=False)},
                        bytes=logits.numel() * 4 + rows * k * 4))
    if device == "cuda":
        fused_shapes, heads, head_dim, k = [(16384, False), (65536, True)], 64, 128, TOPK
    else:
        fused_shapes, heads, head_dim, k = [(512, False)], 8, 64, 64
    for tokens, fused_only in fused_shapes:
        args = causal_inputs(tokens, heads, head_dim, torch.float8_e4m3fn, device)
        flops = 2 * heads * head_dim * tokens * (tokens + 1) // 2

        def unfused(a=args):
            return musetalk_fast.ops.topk_indices(musetalk_fast.ops.lightning_indexer(*a), k, a[4], a[5])

        # At T=S=65536 the unfused path needs 16 GiB for the logits: it runs as an "(info)" row (not the
        # baseline of the ratio) so an out-of-memory there is reported, not fatal.
        baselines = {("ours unfused (info)" if fused_only else "ours unfused: indexer + topk_indices"): unfused}
        out.append(Case("lightning_indexer_topk", f"T=S={tokens} H={heads} D={head_dim} k={k} causal fp8",
                        {"ours fused": lambda a=args: musetalk_fast.ops.lightning_indexer_topk(*a, k)}, baselines,
                        flops=flops, roofline="fp8" if device == "cuda" else "fp32"))
    return out

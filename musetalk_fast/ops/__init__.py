"""Every musetalk_fast op as a plain Python function with autograd (the same ops as
torch.ops.musetalk_fast.<name>); importing this registers the fake impls, autograd and the Triton
CUDA kernels. docs/ops.md is the full contract: shapes, dtypes, semantics and gradients.

    gated_attention          sigmoid-gated SDPA, gate fused in the epilogue (Qwen gated attention)
    gated_attention_varlen   the same over packed sequences (cu_seqlens, as flash_attn_varlen_func)
    sinkhorn                 doubly-stochastic projection of n x n logits (DeepSeek mHC)
    mhc_pre, mhc_post        mHC stream mixing around a layer
    lightning_indexer        DeepSeek Sparse Attention's FP8 indexer logits
    fp8_quantize             per-row / per-block e4m3 quantisation
    topk_indices             top-k key indices per row within [ks, ke)
    lightning_indexer_topk   the indexer's top-k without the [T, S] logits
    sparse_attention         attention over the selected keys only
    engram_hash, engram_gather, engram_lookup   DeepSeek Engram hashed n-gram memory
    engram_lookup_async      engram_lookup on a side stream, to overlap the compute after it

    use_reference_ops(), set_reference_ops(bool)   every wrapper above calls musetalk_fast.reference instead
"""
from .backend import reference_ops_enabled, set_reference_ops, use_reference_ops
from .engram import engram_gather, engram_hash, engram_lookup, engram_lookup_async
from .gated_attention import gated_attention, gated_attention_varlen, set_gated_attention_deterministic
from .lightning_indexer import fp8_quantize, lightning_indexer
from .mhc import mhc_post, mhc_pre
from .sinkhorn import sinkhorn
from .sparse_attention import sparse_attention
from .topk import lightning_indexer_topk, topk_indices

__all__ = [
    "gated_attention", "sinkhorn", "mhc_pre", "mhc_post", "lightning_indexer", "fp8_quantize", "topk_indices",
    "lightning_indexer_topk", "sparse_attention", "engram_hash", "engram_gather", "engram_lookup",
    "engram_lookup_async", "gated_attention_varlen", "set_gated_attention_deterministic",
    "use_reference_ops", "set_reference_ops", "reference_ops_enabled",
]

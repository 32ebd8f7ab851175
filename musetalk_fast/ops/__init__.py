"""Every op as a plain Python function with autograd; importing registers fakes, autograd and
the Triton CUDA kernels into torch.ops.musetalk_fast."""
from .gated_attention import gated_attention  # noqa: F401
from .reference_routed import (  # noqa: F401
    engram_gather,
    engram_hash,
    engram_lookup,
    fp8_quantize,
    lightning_indexer,
    lightning_indexer_topk,
    mhc_post,
    mhc_pre,
    sparse_attention,
    topk_indices,
)
from .sinkhorn import sinkhorn  # noqa: F401

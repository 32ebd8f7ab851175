"""Ops whose kernels are not written yet: they run through musetalk_fast.reference on every device
(CompositeImplicitAutograd, so autograd and torch.compile go through the reference's torch ops).
Each moves to its own module (ops/<family>.py) when its kernels land.
"""
from .. import reference
from .library import op, register_composite

REFERENCE_ROUTED = {
    "lightning_indexer": reference.lightning_indexer,
    "fp8_quantize": reference.fp8_quantize,
    "topk_indices": reference.topk_indices,
    "lightning_indexer_topk": reference.lightning_indexer_topk,
    "sparse_attention": reference.sparse_attention,
    "mhc_pre": reference.mhc_pre,
    "mhc_post": reference.mhc_post,
    "engram_hash": reference.engram_hash,
    "engram_gather": reference.engram_gather,
    "engram_lookup": reference.engram_lookup,
}

for _name, _fn in REFERENCE_ROUTED.items():
    register_composite(_name, _fn)


def lightning_indexer(q, k, k_scale, weights, ks, ke):
    return op("lightning_indexer")(q, k, k_scale, weights, ks, ke)


def fp8_quantize(x, block=None, ue8m0=False):
    return op("fp8_quantize")(x, block, ue8m0)


def topk_indices(logits, k, ks=None, ke=None, sorted=False):
    return op("topk_indices")(logits, k, ks, ke, sorted)


def lightning_indexer_topk(q, k, k_scale, weights, ks, ke, topk):
    return op("lightning_indexer_topk")(q, k, k_scale, weights, ks, ke, topk)


def sparse_attention(q, k, v, indices, sm_scale=None):
    return op("sparse_attention")(q, k, v, indices, sm_scale)


def mhc_pre(x, phi, alpha, bias, iters=20):
    return op("mhc_pre")(x, phi, alpha, bias, iters)


def mhc_post(x, f_out, h_post, h_res):
    return op("mhc_post")(x, f_out, h_post, h_res)


def engram_hash(ids, multipliers, moduli, offsets, pad_id=0):
    return op("engram_hash")(ids, multipliers, moduli, offsets, pad_id)


def engram_gather(table, rows, sparse=False):
    return op("engram_gather")(table, rows, sparse)


def engram_lookup(ids, table, multipliers, moduli, offsets, pad_id=0, sparse=False):
    return op("engram_lookup")(ids, table, multipliers, moduli, offsets, pad_id, sparse)

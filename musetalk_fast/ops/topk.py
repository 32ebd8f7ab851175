"""topk_indices and lightning_indexer_topk: the top-k key indices per query (docs/ops.md §2).

CPU: csrc/topk/cpu.cpp (std::nth_element per row; the fused op computes one logits row at a time).
CUDA: the Triton kernels of kernels/topk.py: a radix select per row, and the fused indexer top-k, which
streams key tiles through a per-query candidate buffer and never writes the [T, S] logits.
"""
import torch

from .backend import routable
from .checks import check_float, check_non_negative, check_rank
from .library import op, qualname, register_cuda
from .lightning_indexer import check_key_range, check_lightning_indexer


def check_topk_indices(logits, k, ks=None, ke=None, sorted=False):
    check_float(logits, "logits")
    check_rank(logits, 2, "logits")
    check_non_negative(k, "k")
    check_key_range(ks, ke, logits.shape[0], logits.shape[1], logits, "logits")


def check_lightning_indexer_topk(q, k, k_scale, weights, ks, ke, topk):
    check_lightning_indexer(q, k, k_scale, weights, ks, ke)
    check_non_negative(topk, "topk")


@torch.library.register_fake(qualname("topk_indices"))
def _topk_indices_fake(logits, k, ks=None, ke=None, sorted=False):
    check_topk_indices(logits, k, ks, ke, sorted)
    return logits.new_empty((logits.shape[0], k), dtype=torch.int32)


@torch.library.register_fake(qualname("lightning_indexer_topk"))
def _lightning_indexer_topk_fake(q, k, k_scale, weights, ks, ke, topk):
    check_lightning_indexer_topk(q, k, k_scale, weights, ks, ke, topk)
    return q.new_empty((q.shape[0], topk), dtype=torch.int32)


def _topk_indices_cuda(logits, k, ks=None, ke=None, sorted=False):
    check_topk_indices(logits, k, ks, ke, sorted)
    from ..kernels.topk import topk_indices

    return topk_indices(logits, k, ks, ke, sorted)


def _lightning_indexer_topk_cuda(q, k, k_scale, weights, ks, ke, topk):
    check_lightning_indexer_topk(q, k, k_scale, weights, ks, ke, topk)
    from ..kernels.topk import lightning_indexer_topk

    return lightning_indexer_topk(q, k, k_scale, weights, ks, ke, topk)


register_cuda("topk_indices", _topk_indices_cuda)
register_cuda("lightning_indexer_topk", _lightning_indexer_topk_cuda)


@routable("topk_indices")
def topk_indices(logits, k, ks=None, ke=None, sorted=False):
    """Indices of the k largest finite logits of each row inside [ks[t], ke[t]), -1-padded.

    logits: [T, S], float16, bfloat16, float32 or float64; k >= 0 (it may exceed S); ks, ke: optional
    [T] int32 on logits' device (default: the whole row), 0 <= ks <= ke <= S. Returns [T, k] int32, -1
    where a row has fewer than k finite logits in its range. sorted=True orders each row by decreasing
    logit; otherwise the order is unspecified. Ties: any valid top-k set. No gradient (an index output).
    """
    return op("topk_indices")(logits, k, ks, ke, sorted)


@routable("lightning_indexer_topk")
def lightning_indexer_topk(q, k, k_scale, weights, ks, ke, topk):
    """The top `topk` keys of each query by lightning-indexer logit, without the [T, S] logits: the set
    of topk_indices(lightning_indexer(q, k, k_scale, weights, ks, ke), topk) (ties: any valid set).

    Arguments as lightning_indexer (q [T, H, D], k [S, D], k_scale [S], weights [T, H], ks, ke [T] int32,
    one device) and topk >= 0. Returns [T, topk] int32 key indices in unspecified order, -1-padded where a
    query sees fewer than topk keys. No gradient (an index output).
    """
    return op("lightning_indexer_topk")(q, k, k_scale, weights, ks, ke, topk)

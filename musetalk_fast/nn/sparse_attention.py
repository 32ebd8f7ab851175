"""DSAttention: DeepSeek Sparse Attention (DeepSeek-V3.2) for MHA/GQA, on the ops of this package.

    indices = top-k keys of each query by the lightning indexer (within its causal range [ks, ke))
    out     = sparse_attention(q, k, v, indices)          each query reads only its top-k keys

Training follows DeepSeek-V3.2 §2.1: the indexer learns from its own loss, indexer_kl_loss(indexer logits,
main attention distribution), with the main attention detached and the indexer's input detached, so the
language-model loss trains the attention and the KL loss trains the indexer, separately. Two stages:
  - dense warm-up (dense_warmup=True): attention over every visible key (sparse_attention with the full
    index list, i.e. dense causal attention); the KL over all visible keys trains the indexer;
  - sparse (default): attention over the indexer's top-k; the KL is over the selected keys.
After a training forward, `indexer_loss` holds the KL loss (add it, weighted, to the model's loss).

Inputs: x [T, hidden] (packed tokens, with ks/ke per token, causal over all T by default),
[B, L, hidden] (B sequences), or, with temporal=True, video features [B, F, N, hidden]: attention over the
F frames of each of the N spatial positions (temporal attention), causal in time by default.
"""
import torch
from torch import nn

from ..ops.sparse_attention import sparse_attention
from .lightning_indexer import LightningIndexer, indexer_kl_loss

PROBS_TOKEN_CHUNK = 1024  # tokens per chunk when recomputing the attention distribution for the KL loss


def sequence_ranges(batch, length, causal, device):
    """ks, ke [batch * length] int32 of B packed sequences: token l of sequence b sees keys
    [b * L, b * L + l + 1) when causal, [b * L, (b + 1) * L) otherwise."""
    start = (torch.arange(batch, device=device, dtype=torch.int32) * length).repeat_interleave(length)
    position = torch.arange(length, device=device, dtype=torch.int32).repeat(batch)
    return start, start + (position + 1 if causal else length)


def all_visible_indices(ks, ke, width=None):
    """[T, width] int32: every key of [ks, ke) in order, -1 after (dense attention as sparse). width, at
    least max(ke - ks), is read from the device when not given."""
    if width is None:
        width = int((ke - ks).max()) if ks.numel() else 0
    keys = ks[:, None] + torch.arange(width, device=ks.device, dtype=torch.int32)[None, :]
    return torch.where(keys < ke[:, None], keys, -1)


class DSAttention(nn.Module):
    """x [..., hidden] -> the same shape (see the module docstring for the layouts).

    Args:
        hidden_size: model width.
        num_heads: query heads Hq.
        num_kv_heads: key/value heads Hkv (Hq % Hkv == 0: GQA/MQA). Defaults to num_heads (MHA).
        head_dim: D. Defaults to hidden_size // num_heads.
        topk: keys per query (DeepSeek-V3.2: 2048); a query sees min(topk, its visible keys).
        index_heads, index_head_dim: the lightning indexer's H (1-128) and D (32, 64 or 128).
        index_fp8: select the top-k with the fp8 indexer (inference); the KL loss always uses the floating one.
        causal: each token sees the keys up to itself (default); else its whole sequence.
        dense_warmup: the warm-up stage (dense attention, KL over every visible key).
        temporal: x is [B, F, N, hidden] and attention runs over the F frames of each position.
        rope: optional callable (q [T, Hq, D], k [T, Hkv, D], position_ids) -> (q, k).
        bias: bias in the q/k/v projections.
    """

    def __init__(self, hidden_size, num_heads, num_kv_heads=None, head_dim=None, topk=2048, index_heads=8,
                 index_head_dim=64, index_fp8=False, causal=True, dense_warmup=False, temporal=False, rope=None,
                 bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.head_dim = head_dim or hidden_size // num_heads
        self.topk, self.index_fp8, self.causal = topk, index_fp8, causal
        self.dense_warmup, self.temporal, self.rope = dense_warmup, temporal, rope
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        self.indexer = LightningIndexer(hidden_size, index_heads, index_head_dim, fp8=index_fp8)
        self.indexer_loss = None

    def forward(self, x, ks=None, ke=None, position_ids=None):
        if self.temporal:  # [B, F, N, C] -> B * N sequences of F frames
            if x.dim() != 4:
                raise ValueError(f"temporal DSAttention takes x [B, F, N, hidden], got shape {list(x.shape)}")
            batch, frames, positions, channels = x.shape
            sequences = x.transpose(1, 2).reshape(batch * positions, frames, channels)
            out = self._sequences(sequences, position_ids)
            return out.view(batch, positions, frames, channels).transpose(1, 2)
        if x.dim() == 3:
            return self._sequences(x, position_ids)
        if x.dim() != 2:
            raise ValueError(f"DSAttention takes x [T, hidden] or [B, L, hidden], got shape {list(x.shape)}")
        if ks is None or ke is None:
            ks, ke = sequence_ranges(1, x.shape[0], self.causal, x.device)
        return self._tokens(x, ks, ke, position_ids)

    def _sequences(self, x, position_ids):
        batch, length, channels = x.shape
        ks, ke = sequence_ranges(batch, length, self.causal, x.device)
        if position_ids is None:
            position_ids = torch.arange(length, device=x.device).repeat(batch)
        # A query sees at most `length` keys: known here, so nothing is read back from the device.
        out = self._tokens(x.reshape(batch * length, channels), ks, ke, position_ids,
                           visible=length if batch else 0)
        return out.view(batch, length, channels)

    def _tokens(self, x, ks, ke, position_ids, visible=None):
        """Packed tokens x [T, hidden], query t seeing keys [ks[t], ke[t]); visible: max(ke - ks) where
        the caller knows it (else read from the device, a sync)."""
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        if self.rope is not None:
            q, k = self.rope(q, k, position_ids)
        if visible is None:
            visible = int((ke - ks).max()) if tokens else 0
        if self.dense_warmup or self.topk >= visible:  # every visible key: dense attention
            indices = all_visible_indices(ks, ke, visible)
        else:
            indices = self.indexer.topk(x.detach(), ks, ke, self.topk, position_ids=position_ids)
        out, lse = sparse_attention(q, k, v, indices[:, None, :].expand(tokens, self.num_kv_heads, -1))
        self.indexer_loss = self._indexer_loss(x, ks, ke, q, k, lse, indices, position_ids) if self.training else None
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))

    def _indexer_loss(self, x, ks, ke, q, k, lse, indices, position_ids):
        """KL(main attention over the selected keys || indexer softmax) (DeepSeek-V3.2 eqs. 3 and 4); the
        attention side detached, the indexer fed a detached x. Dense warm-up: over every visible key."""
        logits = self.indexer(x.detach(), ks, ke, position_ids=position_ids, fp8=False)  # [T, T]
        probs = self._attention_distribution(q.detach(), k.detach(), lse, indices)
        return indexer_kl_loss(logits, probs[:, None, :], None if self.dense_warmup else indices)

    @torch.no_grad()
    def _attention_distribution(self, q, k, lse, indices):
        """sum over heads of the main attention's probabilities, as [T, S]: P = exp(scale q.k - lse) on the
        selected keys (recomputed from lse, in token chunks), 0 elsewhere."""
        tokens, group = q.shape[0], self.num_heads // self.num_kv_heads
        dtype = torch.promote_types(q.dtype, torch.float32)  # float64 stays float64 (its lse is float64)
        probs = torch.zeros(tokens, k.shape[0], dtype=dtype, device=q.device)
        for t0 in range(0, tokens, PROBS_TOKEN_CHUNK):
            rows = slice(t0, t0 + PROBS_TOKEN_CHUNK)
            idx = indices[rows].long()
            valid = idx >= 0
            keys = k.to(dtype)[idx.clamp_min(0)]  # [t, K, Hkv, D]
            qg = q[rows].to(dtype).view(-1, self.num_kv_heads, group, self.head_dim)
            scores = torch.einsum("tgqd,tkgd->tgqk", qg, keys) * self.head_dim**-0.5
            finite_lse = torch.where(torch.isinf(lse[rows]), 0.0, lse[rows]).view(-1, self.num_kv_heads, group, 1)
            p = torch.exp(scores - finite_lse).sum(dim=(1, 2))  # [t, K]
            probs[rows].scatter_add_(1, idx.clamp_min(0), torch.where(valid, p, 0.0))
        return probs

"""GatedAttention: a drop-in attention block with Qwen's G1 output gate, fused in the kernel.

As in Qwen3-Next, the gate is packed into q_proj: for each head, q_proj emits the query and its
gate logits side by side, so one matmul gives both. The attention runs on [B, L, H, D] views
transposed to [B, H, L, D] without copies. Packed clips of different lengths ([T, hidden] with
cu_seqlens) run through gated_attention_varlen. Cross-attention: forward(x, context=c) takes the keys
and values from c [B, S, context_size] (e.g. audio tokens) instead of x.
"""
from torch import nn

from ..ops.gated_attention import gated_attention, gated_attention_varlen


class GatedAttention(nn.Module):
    """x [B, L, hidden] -> [B, L, hidden].

    Args:
        hidden_size: model width.
        num_heads: query heads Hq.
        num_kv_heads: key/value heads Hkv (Hq % Hkv == 0; GQA/MQA). Defaults to num_heads.
        head_dim: D. Defaults to hidden_size // num_heads.
        head_wise_gate: one gate per head (gate [B, Hq, L, 1]) instead of one per channel.
        is_causal: default causal flag (top-left aligned), overridable per call; it stands in for
            an attention mask.
        rope: optional callable (q, k, position_ids) -> (q, k) on [B, L, H, D] tensors.
        bias: bias in the q/k/v projections.
        context_size: width of the cross-attention context (the k/v projections' input); defaults to hidden_size.
    """

    def __init__(self, hidden_size, num_heads, num_kv_heads=None, head_dim=None, head_wise_gate=False,
                 is_causal=False, rope=None, bias=False, context_size=None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        self.head_dim = head_dim or hidden_size // num_heads
        self.gate_dim = 1 if head_wise_gate else self.head_dim
        self.is_causal = is_causal
        self.rope = rope
        self.q_proj = nn.Linear(hidden_size, num_heads * (self.head_dim + self.gate_dim), bias=bias)
        kv_input = context_size or hidden_size
        self.k_proj = nn.Linear(kv_input, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_input, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def forward(self, x, is_causal=None, position_ids=None, cu_seqlens=None, max_seqlen=None, context=None):
        """x [B, L, hidden]; or packed sequences x [T, hidden] with cu_seqlens (int32 [B + 1]) and
        max_seqlen (rope then sees [1, T, H, D] tensors and position_ids). context [B, S, context_size]:
        cross-attention, keys and values from context (no rope, no packed sequences)."""
        if context is not None:
            self._check_context(x, context, cu_seqlens)
        elif cu_seqlens is not None:
            return self._forward_packed(x, cu_seqlens, max_seqlen, is_causal, position_ids)
        source = x if context is None else context  # of the keys and values
        batch, length, _ = x.shape
        query_and_gate = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim + self.gate_dim)
        q, gate = query_and_gate.split([self.head_dim, self.gate_dim], dim=-1)
        k = self.k_proj(source).view(batch, source.shape[1], self.num_kv_heads, self.head_dim)
        v = self.v_proj(source).view(batch, source.shape[1], self.num_kv_heads, self.head_dim)
        if self.rope is not None and context is None:
            q, k = self.rope(q, k, position_ids)
        causal = self.is_causal if is_causal is None else is_causal
        out = gated_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), gate.transpose(1, 2),
                              is_causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))

    def _check_context(self, x, context, cu_seqlens):
        if cu_seqlens is not None:
            raise ValueError("cross-attention (context) does not take packed sequences (cu_seqlens)")
        if x.dim() != 3 or context.dim() != 3 or context.shape[0] != x.shape[0]:
            raise ValueError(f"cross-attention takes x [B, L, hidden] and context [B, S, context_size], got "
                             f"x {list(x.shape)} and context {list(context.shape)}")
        if context.shape[2] != self.k_proj.in_features:
            raise ValueError(f"context must have width context_size = {self.k_proj.in_features}, "
                             f"got shape {list(context.shape)}")

    def _forward_packed(self, x, cu_seqlens, max_seqlen, is_causal, position_ids):
        total = x.shape[0]
        query_and_gate = self.q_proj(x).view(total, self.num_heads, self.head_dim + self.gate_dim)
        q, gate = query_and_gate.split([self.head_dim, self.gate_dim], dim=-1)
        k = self.k_proj(x).view(total, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(total, self.num_kv_heads, self.head_dim)
        if self.rope is not None:
            q, k = (t[0] for t in self.rope(q.unsqueeze(0), k.unsqueeze(0), position_ids))
        if max_seqlen is None:
            max_seqlen = int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
        causal = self.is_causal if is_causal is None else is_causal
        out = gated_attention_varlen(q, k, v, gate, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, is_causal=causal)
        return self.o_proj(out.reshape(total, self.num_heads * self.head_dim))

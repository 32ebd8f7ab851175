"""The U-Net's blocks. Each residual layer maps frames [B*F, C, h, w] to its branch output of the same shape
(MHCResidual adds the residual); `Conditioning` carries what they read besides the features."""
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn

from ..nn import DSAttention, Engram, GatedAttention, MHCResidual, expand_streams, merge_streams
from ..nn.sparse_attention import sequence_ranges
from .embeddings import FrameRotary

INDEXER_LOSS_SEQUENCES = 64  # position sequences (of F frames) the temporal indexer's KL loss is taken on


@dataclass
class Conditioning:
    time: torch.Tensor   # [B*F, time_dim] flow-time embedding, repeated over the frames
    audio: torch.Tensor  # [B*F, W, audio_dim] each frame's audio tokens
    frames: int          # F
    indexer_losses: list = field(default_factory=list)  # the temporal indexers' KL losses (training)


def zero_(module):
    """Zero-initialise a residual branch's last layer, so the branch starts as the identity (ADM, Dhariwal &
    Nichol 2021)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3, time scale-shift, GroupNorm-SiLU-conv3x3 (ADM's ResBlock, residual branch only)."""

    def __init__(self, channels, time_dim, groups):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(groups, channels), nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, 2 * channels)
        self.conv2 = zero_(nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x, cond):
        # contiguous: MHCResidual hands a channels-last view, and group_norm's forward-mode AD (torch.func.jvp,
        # the trainer's exact JVP check) cannot view one
        h = self.conv1(nn.functional.silu(self.norm1(x.contiguous())))
        scale, shift = self.time_proj(nn.functional.silu(cond.time)).to(h.dtype)[..., None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.conv2(nn.functional.silu(h))


def frame_tokens(x):
    """[N, C, h, w] -> [N, h*w, C] (a view of MHCResidual's channels-last layer input)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def frame_image(tokens, like):
    """[N, h*w, C] -> like's [N, C, h, w], a channels-last view: MHCResidual reads it back as tokens without
    a copy."""
    batch, channels, height, width = like.shape
    return tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


class SpatialSelfAttention(nn.Module):
    """Gated self-attention over the h*w positions of each frame (pre-LayerNorm, as the attention blocks below)."""

    def __init__(self, channels, head_dim):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attention = GatedAttention(channels, channels // head_dim, head_dim=head_dim)
        zero_(self.attention.o_proj)

    def forward(self, x, cond):
        return frame_image(self.attention(self.norm(frame_tokens(x))), x)


class AudioCrossAttention(nn.Module):
    """Gated cross-attention from the h*w positions of each frame to that frame's W audio tokens."""

    def __init__(self, channels, audio_dim, head_dim):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attention = GatedAttention(channels, channels // head_dim, head_dim=head_dim, context_size=audio_dim)
        zero_(self.attention.o_proj)

    def forward(self, x, cond):
        return frame_image(self.attention(self.norm(frame_tokens(x)), context=cond.audio.to(x.dtype)), x)


class TemporalDSAttention(DSAttention):
    """DSAttention(temporal=True) whose indexer KL loss is taken on at most INDEXER_LOSS_SEQUENCES of the B*h*w
    position sequences, evenly strided. DSAttention's loss scores every packed token against every other
    ([T, T] logits and attention probabilities, T = B*h*w*F: 8192 at the default config's level 1 with B = 4,
    F = 8, i.e. 268 MB each and more work than the attention itself), while only each sequence's F x F block
    is visible; the loss is a mean over queries, so the strided subset estimates it without bias."""

    def forward(self, x, ks=None, ke=None, position_ids=None):
        self._frames = x.shape[1]  # x [B, F, N, hidden]: every sequence is F tokens long
        return super().forward(x, ks, ke, position_ids)

    def _indexer_loss(self, x, ks, ke, q, k, lse, indices, position_ids):
        frames = self._frames
        sequences = x.shape[0] // frames
        stride = max(1, -(-sequences // INDEXER_LOSS_SEQUENCES))
        chosen = torch.arange(0, sequences, stride, device=x.device)
        rows = (chosen[:, None] * frames + torch.arange(frames, device=x.device)).flatten()
        # key indices are packed-token ids: move each chosen sequence's from its place to its place in the subset
        shift = ((torch.arange(chosen.numel(), device=x.device) - chosen) * frames).repeat_interleave(frames)
        picked = indices[rows]
        picked = torch.where(picked >= 0, picked + shift[:, None].to(picked.dtype), picked)
        sub_ks, sub_ke = sequence_ranges(chosen.numel(), frames, self.causal, x.device)
        return super()._indexer_loss(x[rows], sub_ks, sub_ke, q[rows], k[rows], lse[rows], picked,
                                     position_ids[rows])


class TemporalAttention(nn.Module):
    """DSA attention across the F frames of each spatial position, non-causal (offline dubbing sees the whole
    clip), frame order by rotary embedding; each query reads its top-k frames (all of them when F <= topk).
    In training the indexer's KL loss goes to cond.indexer_losses (not kept on the module, which then
    holds no graph tensors between steps and deep-copies, e.g. for EMA weights)."""

    def __init__(self, channels, head_dim, topk, index_heads):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attention = TemporalDSAttention(channels, channels // head_dim, head_dim=head_dim, topk=topk,
                                             index_heads=index_heads, index_head_dim=head_dim, index_fp8=False,
                                             causal=False, temporal=True, rope=FrameRotary(head_dim))
        zero_(self.attention.o_proj)

    def forward(self, x, cond):
        frames_batch, channels, height, width = x.shape
        tokens = self.norm(frame_tokens(x)).view(frames_batch // cond.frames, cond.frames, height * width, channels)
        out = self.attention(tokens)
        if self.attention.indexer_loss is not None:
            cond.indexer_losses.append(self.attention.indexer_loss)
            self.attention.indexer_loss = None
        return frame_image(out.reshape(frames_batch, height * width, channels), x)


class MHCStack(nn.Module):
    """Layers of one width on n mHC residual streams: expand once, each layer an MHCResidual (image layout),
    merge once. [B*F, C, h, w] -> the same shape."""

    def __init__(self, layers, channels, streams):
        super().__init__()
        self.streams = streams
        self.blocks = nn.ModuleList(MHCResidual(layer, n=streams, channels=channels, image=True) for layer in layers)

    def forward(self, x, cond, checkpoint=False):
        streams = expand_streams(x, self.streams, image=True)
        for block in self.blocks:
            if checkpoint:  # recompute the block in the backward instead of keeping its activations
                streams = torch.utils.checkpoint.checkpoint(block, streams, cond, use_reentrant=False)
            else:
                streams = block(streams, cond)
        return merge_streams(streams, image=True)


class EngramJoin(nn.Module):
    """Engram over the audio codes at the bottleneck: the frame's features pooled over h*w are the hidden
    state [B, F, C] (its n-grams run over the frames), and the memory joins every position of the frame
    through a zero-initialised per-channel gate: x + gate * Engram(pool(x), codes)."""

    def __init__(self, channels, vocab_size, embed_dim, orders, heads, table_size):
        super().__init__()
        self.engram = Engram(channels, vocab_size, embed_dim=embed_dim, orders=orders, heads=heads,
                             table_size=table_size)
        self.gate = nn.Parameter(torch.zeros(channels))

    def forward(self, x, codes):
        batch, frames = codes.shape
        pooled = x.mean(dim=(2, 3)).view(batch, frames, -1)
        memory = self.engram(pooled, codes)
        return x + (self.gate * memory).to(x.dtype).reshape(batch * frames, -1, 1, 1)

"""The U-Net's blocks. Each residual layer maps frames [B*F, C, h, w] to its branch output of the same shape
(MHCResidual adds the residual); `Conditioning` carries what they read besides the features."""
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from ..nn import DSAttention, Engram, GatedAttention, MHCResidual, expand_streams, merge_streams
from .embeddings import FrameRotary


@dataclass
class Conditioning:
    time: torch.Tensor   # [B*F, time_dim] flow-time embedding, repeated over the frames
    audio: torch.Tensor  # [B*F, W, audio_dim] each frame's audio tokens
    frames: int          # F


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
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        scale, shift = self.time_proj(nn.functional.silu(cond.time)).to(h.dtype)[..., None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.conv2(nn.functional.silu(h))


def frame_tokens(x):
    """[N, C, h, w] -> [N, h*w, C]."""
    return x.flatten(2).transpose(1, 2)


def frame_image(tokens, like):
    """[N, h*w, C] -> like's [N, C, h, w]."""
    return tokens.transpose(1, 2).reshape(like.shape)


class SpatialSelfAttention(nn.Module):
    """Gated self-attention over the h*w positions of each frame."""

    def __init__(self, channels, head_dim, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attention = GatedAttention(channels, channels // head_dim, head_dim=head_dim)
        zero_(self.attention.o_proj)

    def forward(self, x, cond):
        return frame_image(self.attention(frame_tokens(self.norm(x))), x)


class AudioCrossAttention(nn.Module):
    """Gated cross-attention from the h*w positions of each frame to that frame's W audio tokens."""

    def __init__(self, channels, audio_dim, head_dim, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attention = GatedAttention(channels, channels // head_dim, head_dim=head_dim, context_size=audio_dim)
        zero_(self.attention.o_proj)

    def forward(self, x, cond):
        return frame_image(self.attention(frame_tokens(self.norm(x)), context=cond.audio.to(x.dtype)), x)


class TemporalAttention(nn.Module):
    """DSA attention across the F frames of each spatial position, non-causal (offline dubbing sees the whole
    clip), frame order by rotary embedding; each query reads its top-k frames (all of them when F <= topk).
    In training the DSAttention keeps its indexer's KL loss in `.attention.indexer_loss`."""

    def __init__(self, channels, head_dim, groups, topk, index_heads):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attention = DSAttention(channels, channels // head_dim, head_dim=head_dim, topk=topk,
                                     index_heads=index_heads, index_head_dim=head_dim, index_fp8=False,
                                     causal=False, temporal=True, rope=FrameRotary(head_dim))
        zero_(self.attention.o_proj)

    def forward(self, x, cond):
        frames_batch, channels, height, width = x.shape
        tokens = frame_tokens(self.norm(x)).view(frames_batch // cond.frames, cond.frames, height * width, channels)
        return frame_image(self.attention(tokens).reshape(frames_batch, height * width, channels), x)


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

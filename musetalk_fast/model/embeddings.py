"""The U-Net's embeddings: the flow times (t, t - r) and the frame positions of the temporal attention."""
import math

import torch
from torch import nn

TIME_SCALE = 1000.0  # t in [0, 1] is embedded as t * 1000, the diffusion range the frequencies below suit


def sinusoidal_embedding(values, dim, max_period=10000.0):
    """[N] floats -> [N, dim]: cos and sin of values * TIME_SCALE at dim / 2 geometric frequencies from 1
    to 1 / max_period (the Transformer's / DDPM's timestep embedding)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device) / half)
    angles = values.float()[:, None] * TIME_SCALE * frequencies[None, :]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return nn.functional.pad(embedding, (0, dim - 2 * half))


class FlowTimeEmbedding(nn.Module):
    """(t, r) [B] -> [B, dim]: an MLP over the sinusoidal embeddings of t and of the interval t - r
    (MeanFlow conditions the average velocity u(z_t, r, t) on both ends; t - r is the usual choice)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))

    def forward(self, t, r):
        features = torch.cat([sinusoidal_embedding(t, self.dim), sinusoidal_embedding(t - r, self.dim)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class FrameRotary(nn.Module):
    """Rotary position embedding (RoFormer, arXiv 2104.09864) of the frame index, for DSAttention's rope
    hook: (q [T, Hq, D], k [T, Hk, D], position_ids [T]) -> rotated (q, k). The temporal attention
    thus knows the frames' order and their distance, for any number of frames."""

    def __init__(self, head_dim, base=10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.register_buffer("inv_freq", base ** (-torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, q, k, position_ids):
        angles = position_ids.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)[:, None, :]  # [T, 1, D]
        cos, sin = angles.cos(), angles.sin()
        rotated = [(x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype) for x in (q, k)]
        return rotated[0], rotated[1]

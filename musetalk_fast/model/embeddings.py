"""The U-Net's embeddings: the flow times (t, t - r) and the frame positions of the temporal attention."""
import math

import torch
from torch import nn

# t in [0, 1] is embedded as t * TIME_SCALE at frequencies from 1 to 1e-4 rad per unit. MeanFlow needs
# du/dt, here by finite differences (the ops have no forward-mode rules), whose truncation error on the
# fastest feature is (h * TIME_SCALE)^2 / 6 for a central step h. With 50, central differences of a random
# tiny U-Net in float32 err by 0.16% at h = 1e-3 and 0.025% at 3e-4 (DDPM's 1000: 39% at 1e-3, 0.55% at 1e-4).
TIME_SCALE = 50.0


def sinusoidal_embedding(values, dim, max_period=10000.0):
    """[N] floats -> [N, dim]: cos and sin of values * TIME_SCALE at dim / 2 geometric frequencies from 1
    to 1 / max_period (the Transformer's / DDPM's timestep embedding)."""
    half = dim // 2
    dtype = torch.promote_types(values.dtype, torch.float32)  # float64 stays float64 (gradcheck, exact JVPs)
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=dtype) / half)
    angles = values.to(dtype)[:, None] * TIME_SCALE * frequencies[None, :]
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
        dtype = torch.promote_types(q.dtype, torch.float32)
        angles = position_ids.to(dtype)[:, None] * self.inv_freq.to(dtype)[None, :]
        angles = torch.cat([angles, angles], dim=-1)[:, None, :]  # [T, 1, D]
        cos, sin = angles.cos(), angles.sin()
        rotated = [(x.to(dtype) * cos + rotate_half(x.to(dtype)) * sin).to(x.dtype) for x in (q, k)]
        return rotated[0], rotated[1]

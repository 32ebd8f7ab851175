"""The MuseTalk-2.0 generator: a latent inpainting U-Net on this package's ops, predicting the clean latent.

    x_pred = MuseTalkUNet(config)(z_t, masked, reference, audio, codes, t, r)

    z_t, masked, reference, x_pred   [B, F, C, h, w]   C = vae.latent_channels (16), h = w = config.latent_size
    audio                            [B, F, W, audio.dim]   W = audio.window_mels, each frame's audio tokens
    codes                            [B, F] int64 in [0, audio.codes)   audio codes (the Engram's ids)
    t, r                             [B] float, 0 <= r <= t <= 1   flow times; one step: t = 1, r = 0, z_t = noise
                                     (not enforced: a finite-difference JVP in t may step just outside)
    mask (optional)                  broadcasts to [B, F, 1, h, w]: 1 on the latent rows that were masked in
                                     pixels; default the lower half (rows >= h // 2). Stage 2's Dynamic Margin
                                     Sampling passes its taller masks (vae.lower_half_mask(h, margin // 8)).

Layout. Frames fold into the batch ([B*F, C, h, w]) everywhere but in the temporal attention and the
Engram. The channel adapter (a 3x3 conv) reads cat(z_t, masked, reference, mask) (3C + 1 channels).
Each level is one stack of same-width layers on mhc_streams mHC residual streams (expanded at the
stack's start, merged at its end; MHCResidual in the image layout around every layer; streams carried
across levels would need every resampling and skip conv run once per stream, +36% FLOPs at n = 4):
blocks_per_level x [ResBlock, and at attention_levels (pre-LayerNorm): gated spatial self-attention over
h*w, gated cross-attention to the frame's audio tokens, DSA temporal attention across the F frames (non-causal,
rotary frame positions, top-k = temporal_topk frames)]. Between levels a stride-2 conv (down) and
nearest x2 + conv (up); the up path joins the down path's skip by a 1x1 conv over the concatenation.
The bottleneck stack (ResBlock, attention, ResBlock) is followed by the Engram join: Engram over the
audio codes with the frame's spatially pooled features as its hidden state, added to every position
through a zero-initialised per-channel gate. The flow times enter every ResBlock as a scale-shift of
an MLP over sinusoidal embeddings of t and t - r. Residual branches' last layers, the gate and the
output conv start at zero (ADM), so the untrained network outputs 0.

Every attention, mixing and memory op is a musetalk_fast op (gated_attention, sparse_attention,
mhc_pre/post with sinkhorn, engram_lookup; the lightning indexer when F > temporal_topk), so
`with musetalk_fast.ops.use_reference_ops():` runs the same weights on musetalk_fast/reference.py.

Size (`python -m musetalk_fast.model.costs --config default|tiny`; FLOPs = 2 per multiply-add):
    default  127.2 M parameters (34.2 M of them the Engram); 26.5 GFLOP forward per frame (F = 8, 32x32 latents)
    tiny       2.5 M parameters ( 0.1 M of them the Engram);  0.39 GFLOP forward per frame (F = 4, 16x16 latents)
"""
import torch
from torch import nn

from ..ops.checks import check_dtype, check_float, check_shape, has_data
from .blocks import (AudioCrossAttention, Conditioning, EngramJoin, MHCStack, ResBlock, SpatialSelfAttention,
                     TemporalAttention, zero_)
from .embeddings import FlowTimeEmbedding

INDEX_HEAD_DIMS = (32, 64, 128)  # the lightning indexer's head dims (its kernels' constraint)


class MuseTalkUNet(nn.Module):
    """See the module docstring. `gradient_checkpointing = True` recomputes each layer in the backward;
    `engram_parameters()` are the Engram's (and its gate's) parameters, frozen in training stage 1;
    `indexer_loss()` is the temporal attention's indexer KL loss of the last training forward."""

    def __init__(self, config):
        super().__init__()
        unet, audio = config.unet, config.audio
        self.config = config
        self.latent_channels = config.vae.latent_channels
        self.levels = len(unet.channels)
        self.gradient_checkpointing = False
        self._indexer_loss = None
        if unet.head_dim not in INDEX_HEAD_DIMS:
            raise ValueError(f"unet.head_dim must be one of {INDEX_HEAD_DIMS} (the temporal indexer's), "
                             f"got {unet.head_dim}")
        for channels in unet.channels:
            if channels % unet.head_dim or channels % unet.norm_groups:
                raise ValueError(f"unet.channels ({channels}) must be multiples of head_dim ({unet.head_dim}) "
                                 f"and norm_groups ({unet.norm_groups})")

        self.time_embedding = FlowTimeEmbedding(unet.time_dim)
        self.audio_norm = nn.LayerNorm(audio.dim)
        self.audio_position = nn.Parameter(torch.randn(audio.window_mels, audio.dim) * 0.02)
        self.stem = nn.Conv2d(3 * self.latent_channels + 1, unet.channels[0], 3, padding=1)

        def stack(level, middle=False):
            channels, attention = unet.channels[level], level in unet.attention_levels
            unit = [lambda: ResBlock(channels, unet.time_dim, unet.norm_groups)]
            if attention:
                unit += [lambda: SpatialSelfAttention(channels, unet.head_dim),
                         lambda: AudioCrossAttention(channels, audio.dim, unet.head_dim),
                         lambda: TemporalAttention(channels, unet.head_dim, unet.temporal_topk,
                                                   unet.temporal_index_heads)]
            if middle:  # ResBlock, attention, ResBlock
                units = unit + [unit[0]]
            else:
                units = unit * unet.blocks_per_level
            return MHCStack([make() for make in units], channels, unet.mhc_streams)

        last = self.levels - 1
        self.down_stacks = nn.ModuleList(stack(level) for level in range(self.levels))
        self.downsamples = nn.ModuleList(nn.Conv2d(unet.channels[level], unet.channels[level + 1], 3, stride=2,
                                                   padding=1) for level in range(last))
        self.middle = stack(last, middle=True)
        self.engram_join = EngramJoin(unet.channels[last], audio.codes, unet.engram_embed_dim, unet.engram_orders,
                                      unet.engram_heads, unet.engram_table_size)
        self.skip_joins = nn.ModuleList(nn.Conv2d(2 * c, c, 1) for c in unet.channels)
        self.up_stacks = nn.ModuleList(stack(level) for level in range(self.levels))
        self.upsamples = nn.ModuleList(nn.Conv2d(unet.channels[level + 1], unet.channels[level], 3, padding=1)
                                       for level in range(last))
        self.out_norm = nn.GroupNorm(unet.norm_groups, unet.channels[0])
        self.out_conv = zero_(nn.Conv2d(unet.channels[0], self.latent_channels, 3, padding=1))

    def engram_parameters(self):
        """The Engram's parameters and its gate's: frozen (with the gate at 0) the model runs without it."""
        return list(self.engram_join.parameters())

    def indexer_loss(self):
        """Sum of the temporal DSAttention indexers' KL losses of the last forward in training mode (add it,
        weighted, to the loss so the indexer learns which frames matter when F > temporal_topk), or None."""
        return self._indexer_loss

    def __getstate__(self):
        """Copies and pickles leave the last forward's indexer loss (a graph tensor) behind."""
        state = super().__getstate__()
        state["_indexer_loss"] = None
        return state

    def lower_half_mask(self, height, width, device, dtype):
        """[1, 1, h, w]: 1 on the rows of the latent whose pixels were masked (the lower half), else 0."""
        rows = (torch.arange(height, device=device) >= height // 2).to(dtype)
        return rows[:, None].expand(height, width)[None, None]

    def check_inputs(self, z_t, masked, reference, audio, codes, t, r, mask=None):
        """Named errors for shapes, dtypes and (on real tensors) values."""
        check_float(z_t, "z_t")
        check_shape(z_t, "z_t", "B, F, C, h, w", [None, None, self.latent_channels, None, None])
        batch, frames, _, height, width = z_t.shape
        factor = 2 ** (self.levels - 1)
        if frames < 1 or batch < 1:
            raise ValueError(f"z_t must have B >= 1 and F >= 1, got shape {list(z_t.shape)}")
        if height % factor or width % factor:
            raise ValueError(f"z_t's h and w must be multiples of {factor} ({self.levels} levels), "
                             f"got shape {list(z_t.shape)}")
        for tensor, name in ((masked, "masked"), (reference, "reference")):
            check_float(tensor, name)
            check_shape(tensor, name, "B, F, C, h, w", list(z_t.shape))
        audio_config = self.config.audio
        check_float(audio, "audio")
        check_shape(audio, "audio", "B, F, W, D", [batch, frames, audio_config.window_mels, audio_config.dim])
        check_dtype(codes, "codes", (torch.int64,))
        check_shape(codes, "codes", "B, F", [batch, frames])
        for tensor, name in ((t, "t"), (r, "r")):
            check_float(tensor, name)
            check_shape(tensor, name, "B", [batch])
        if mask is not None:
            check_float(mask, "mask")
            full = (batch, frames, 1, height, width)
            try:
                fits = mask.dim() <= 5 and torch.broadcast_shapes(mask.shape, full) == full
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(f"mask must broadcast to [B, F, 1, h, w] = {list(full)}, got {list(mask.shape)}")
        # t and r are not range-checked: a finite-difference JVP in t steps past r = t and t = 1
        if has_data(codes) and codes.numel():
            low, high = torch.stack([codes.min(), codes.max()]).tolist()  # one device sync
            if low < 0 or high >= audio_config.codes:
                raise ValueError(f"codes must be in [0, {audio_config.codes}) (audio.codes), got values in "
                                 f"[{low}, {high}]")

    def forward(self, z_t, masked, reference, audio, codes, t, r, mask=None):
        self.check_inputs(z_t, masked, reference, audio, codes, t, r, mask)
        batch, frames, channels, height, width = z_t.shape
        dtype = self.stem.weight.dtype
        images = [x.reshape(batch * frames, channels, height, width).to(dtype) for x in (z_t, masked, reference)]
        if mask is None:
            mask = self.lower_half_mask(height, width, z_t.device, dtype)
        mask = mask.to(device=z_t.device, dtype=dtype).expand(batch, frames, 1, height, width)
        mask = mask.reshape(batch * frames, 1, height, width)
        x = self.stem(torch.cat([*images, mask], dim=1))
        self._indexer_loss = None
        tokens = self.audio_norm(audio.to(self.audio_norm.weight.dtype)) + self.audio_position
        cond = Conditioning(time=self.time_embedding(t, r).repeat_interleave(frames, dim=0),
                            audio=tokens.reshape(batch * frames, *audio.shape[2:]), frames=frames)
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()

        skips = []
        for level in range(self.levels):
            x = self.down_stacks[level](x, cond, checkpoint)
            skips.append(x)
            if level < self.levels - 1:
                x = self.downsamples[level](x)
        x = self.engram_join(self.middle(x, cond, checkpoint), codes)
        for level in reversed(range(self.levels)):
            x = self.skip_joins[level](torch.cat([x, skips[level]], dim=1))
            x = self.up_stacks[level](x, cond, checkpoint)
            if level > 0:
                x = self.upsamples[level - 1](nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        self._indexer_loss = sum(cond.indexer_losses) if cond.indexer_losses else None
        out = self.out_conv(nn.functional.silu(self.out_norm(x.contiguous())))
        return out.view(batch, frames, channels, height, width).to(z_t.dtype)

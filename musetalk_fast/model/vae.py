"""The 16-channel VAE: diffusers' AutoencoderKL built from `config.vae`, per-channel latent statistics
measured on data, encode/decode helpers, and the lower-half mask of MuseTalk's inpainting.

    vae = build_vae(config)                                 # random init, or config.vae.pretrained (local only)
    stats = compute_latent_stats(vae, batches)              # per-channel shift/scale of the posterior means
    z = encode(vae, stats, images)                          # [N, 3, H, W] or [B, F, 3, H, W] in [-1, 1]
    images = decode(vae, stats, z)                          #   -> [N, 16, h, w] / [B, F, 16, h, w], h = H / 8
    masked = mask_lower_half(images)                        # MuseTalk's input: the lower half blanked in pixels

Latents are normalised per channel, z = (mu - shift) / scale with shift and scale the mean and the standard
deviation of the posterior means over the data (never SD's single constant 0.18215: a 16-channel latent's
channels differ in scale by an order of magnitude).
"""
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

STATS_FILE = "latent_stats.json"  # beside the diffusers files of a VAE folder written by save_vae


def _autoencoder_kwargs(config):
    vae = config.vae
    levels = len(vae.block_channels)
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(vae.block_channels),
                layers_per_block=vae.layers_per_block, latent_channels=vae.latent_channels,
                norm_num_groups=vae.norm_groups, sample_size=config.image_size)


def build_vae(config, pretrained=None):
    """diffusers.AutoencoderKL for `config` (a ModelConfig): random init, or weights from `pretrained`
    (default config.vae.pretrained): a local diffusers folder (config.json + weights) or a .safetensors
    file of an AutoencoderKL state dict. Never downloads. A missing path or weights whose shapes differ from
    `config.vae` give a ValueError naming the path and the difference."""
    from diffusers import AutoencoderKL

    pretrained = config.vae.pretrained if pretrained is None else pretrained
    if pretrained is None:
        return AutoencoderKL(**_autoencoder_kwargs(config))
    path = Path(pretrained)
    if not path.exists():
        raise ValueError(f"vae.pretrained {path} does not exist (a local diffusers folder or .safetensors file)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"vae.pretrained {path} is a folder without config.json (not a diffusers model folder)")
        _check_folder_config(path, config)
        return AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
    if path.suffix != ".safetensors":
        raise ValueError(f"vae.pretrained {path} must be a diffusers folder or a .safetensors file")
    from safetensors.torch import load_file

    vae = AutoencoderKL(**_autoencoder_kwargs(config))
    _load_state(vae, load_file(str(path)), path)
    return vae


def _check_folder_config(path, config):
    saved = json.loads((path / "config.json").read_text())
    expected = _autoencoder_kwargs(config)
    for key in ("latent_channels", "block_out_channels", "layers_per_block", "norm_num_groups"):
        want, got = expected[key], saved.get(key)
        if isinstance(got, list):
            got = tuple(got)
        if got != want:
            raise ValueError(f"vae.pretrained {path}: {key} is {got} there but {want} in the config "
                             f"(config.vae: latent_channels, block_channels, layers_per_block, norm_groups)")


def _load_state(vae, state, path):
    own = vae.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        details = "; ".join(filter(None, [
            f"missing {len(missing)} tensors (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})" if unexpected else "",
            f"shapes differ: {wrong[0]}" + (f" and {len(wrong) - 1} more" if len(wrong) > 1 else "") if wrong else ""]))
        raise ValueError(f"vae.pretrained {path} does not fit config.vae: {details}")
    vae.load_state_dict(state)


class LatentStats(nn.Module):
    """Per-channel shift and scale of the VAE latents (buffers: saved and moved with the model)."""

    def __init__(self, channels):
        super().__init__()
        self.register_buffer("shift", torch.zeros(channels))
        self.register_buffer("scale", torch.ones(channels))

    def _per_channel(self, buffer, latents):
        return buffer.to(latents.dtype).view(-1, 1, 1)  # channels are dim -3 of [..., C, h, w]

    def normalise(self, latents):
        return (latents - self._per_channel(self.shift, latents)) / self._per_channel(self.scale, latents)

    def denormalise(self, latents):
        return latents * self._per_channel(self.scale, latents) + self._per_channel(self.shift, latents)

    def to_dict(self):
        return {"shift": self.shift.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, values):
        stats = cls(len(values["shift"]))
        stats.shift.copy_(torch.tensor(values["shift"]))
        stats.scale.copy_(torch.tensor(values["scale"]))
        return stats


def _check_images(images, name="images"):
    if not torch.is_tensor(images):
        raise TypeError(f"{name} must be a torch tensor (got {type(images).__name__})")
    if images.dim() not in (4, 5) or images.shape[-3] != 3:
        raise ValueError(f"{name} must be [N, 3, H, W] or [B, F, 3, H, W] (got {tuple(images.shape)})")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point in [-1, 1] (got {images.dtype}; see to_model_images)")


def _flat(tensor):
    """[B, F, C, H, W] -> ([B*F, C, H, W], restore) ; [N, C, H, W] unchanged."""
    if tensor.dim() == 5:
        lead = tensor.shape[:2]
        return tensor.flatten(0, 1), lambda out: out.unflatten(0, lead)
    return tensor, lambda out: out


def posterior_means(vae, images):
    """The encoder's posterior means (unnormalised latents) of images [N, 3, H, W] in [-1, 1]."""
    return vae.encode(images).latent_dist.mean


def encode(vae, stats, images, sample=False, generator=None):
    """Normalised latents of images [N, 3, H, W] or [B, F, 3, H, W] in [-1, 1]: the posterior mean (or a sample
    with sample=True), minus stats.shift, over stats.scale. Keeps the leading shape."""
    _check_images(images)
    flat, restore = _flat(images)
    dist = vae.encode(flat.to(vae.dtype)).latent_dist
    latents = dist.sample(generator) if sample else dist.mean
    return restore(stats.normalise(latents))


def decode(vae, stats, latents, clamp=False):
    """Images in [-1, 1] (not clamped unless clamp=True: losses want the gradient) of normalised latents
    [N, C, h, w] or [B, F, C, h, w]."""
    if latents.dim() not in (4, 5) or latents.shape[-3] != stats.shift.numel():
        raise ValueError(f"latents must be [N, {stats.shift.numel()}, h, w] or [B, F, {stats.shift.numel()}, h, w] "
                         f"(got {tuple(latents.shape)})")
    flat, restore = _flat(latents)
    images = vae.decode(stats.denormalise(flat).to(vae.dtype)).sample
    return restore(images.clamp(-1, 1) if clamp else images)


@torch.no_grad()
def compute_latent_stats(vae, frames_iterable):
    """LatentStats from data: per channel, the mean and standard deviation of the posterior means over every
    pixel of every frame of `frames_iterable` (batches [N, 3, H, W] float in [-1, 1], or uint8 [N, 3, H, W]
    which is rescaled). Accumulated in float64; a channel with zero spread keeps scale 1."""
    channels = vae.config.latent_channels
    count, total, squares = 0, torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    for batch in frames_iterable:
        if batch.dtype == torch.uint8:
            batch = to_model_images(batch)
        _check_images(batch, "frames")
        flat, _ = _flat(batch)
        mu = posterior_means(vae, flat.to(vae.dtype)).double()
        total += mu.sum((0, 2, 3)).cpu()
        squares += mu.square().sum((0, 2, 3)).cpu()
        count += mu.shape[0] * mu.shape[2] * mu.shape[3]
    if count == 0:
        raise ValueError("frames_iterable gave no frames to measure the latent statistics on")
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    stats = LatentStats(channels)
    stats.shift.copy_(mean.float())
    stats.scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)).float())
    return stats


def to_model_images(frames, image_size=None):
    """uint8 frames [N, 3, H, W] (torch) or [N, H, W, 3] (numpy) -> float32 [N, 3, S, S] in [-1, 1], resized to
    image_size (area interpolation) when it differs."""
    if isinstance(frames, np.ndarray):
        frames = np.ascontiguousarray(frames)
        frames = torch.from_numpy(frames if frames.flags.writeable else frames.copy()).permute(0, 3, 1, 2)
    images = frames.float() / 127.5 - 1.0
    if image_size is not None and images.shape[-1] != image_size:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="area")
    return images


def to_uint8(images):
    """Images in [-1, 1] [..., 3, H, W] -> uint8 [..., H, W, 3] numpy (for video writers)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


def lower_half_mask(image_size, margin=0):
    """MuseTalk's inpainting mask in pixels: float32 [1, 1, S, S], 1 on the rows to generate (the lower half,
    from row S // 2 - margin down), 0 on the rows kept. `margin` (int, or a tensor [N] for one per image ->
    [N, 1, S, S]) moves the top of the masked region up by that many extra rows: stage 2's Dynamic Margin
    Sampling. For latents, call it with the latent size and margin // 8."""
    margins = torch.as_tensor(margin).reshape(-1)
    if margins.is_floating_point() or (margins < 0).any() or (margins >= image_size // 2 + 1).any():
        raise ValueError(f"margin must be whole numbers of rows in [0, {image_size // 2}] (got {margin})")
    rows = torch.arange(image_size)
    top = image_size // 2 - margins.view(-1, 1)
    mask = (rows.view(1, -1) >= top).float()  # [N, S]
    return mask.view(-1, 1, image_size, 1).expand(-1, 1, image_size, image_size).contiguous()


def mask_lower_half(images, margin=0):
    """Images [..., 3, S, S] with the lower half (see lower_half_mask) set to 0 (mid grey in [-1, 1])."""
    size = images.shape[-1]
    keep = 1.0 - lower_half_mask(size, margin).to(images.device, images.dtype)
    if images.dim() == 5 and keep.shape[0] > 1:
        keep = keep.view(images.shape[0], 1, 1, size, size)
    return images * keep


def save_vae(folder, vae, stats):
    """The VAE as a diffusers folder (config.json + safetensors weights) with latent_stats.json beside it:
    build_vae(config, pretrained=folder) and load_vae(folder, config) read it back."""
    folder = Path(folder)
    vae.save_pretrained(folder, safe_serialization=True)
    (folder / STATS_FILE).write_text(json.dumps(stats.to_dict()) + "\n")


def load_vae(folder, config):
    """(vae, stats) of a folder written by save_vae (train-vae's output)."""
    folder = Path(folder)
    vae = build_vae(config, pretrained=folder)
    stats_path = folder / STATS_FILE
    if not stats_path.is_file():
        raise ValueError(f"vae {folder} has no {STATS_FILE} (written by `musetalk-fast train-vae`); "
                         f"compute one with compute_latent_stats")
    return vae, LatentStats.from_dict(json.loads(stats_path.read_text()))

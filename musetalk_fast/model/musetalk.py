"""MuseTalk: the whole model in one module and one checkpoint file.

    vae            diffusers AutoencoderKL, 16 latent channels (vae.build_vae)
    latent_stats   per-channel shift/scale of the latents (vae.LatentStats)
    audio_encoder  log-mel windows [B, F, W, n_mels] -> audio tokens [B, F, W, dim]
    codebook       audio tokens -> audio codes [B, F] (the Engram's ids)
    unet           the generator (x-prediction, flow times t, r)

One-step generation (MeanFlow, t = 1, r = 0): x = unet(noise, masked, reference, audio, codes, 1, 0).

The checkpoint is one torch file {"format", "config" (ModelConfig.to_dict()), "state_dict"}, written
to a temporary file beside the target and renamed over it, so a crash never leaves half a file.
"""
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_save
from .config import ModelConfig

CHECKPOINT_FORMAT = "musetalk_fast.model/1"


class MuseTalk(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        from .audio import AudioCodebook, AudioEncoder
        from .unet import MuseTalkUNet
        from .vae import LatentStats, build_vae

        self.config = config
        self.vae = build_vae(config)
        self.latent_stats = LatentStats(config.vae.latent_channels)
        self.audio_encoder = AudioEncoder(config)
        self.codebook = AudioCodebook(config)
        self.unet = MuseTalkUNet(config)

    def audio_features(self, windows):
        """Feature windows [B, F, W, n_mels] (audio.frame_windows) -> (audio tokens [B, F, W, dim], audio codes
        [B, F] int64)."""
        return self.audio_encoder(windows), self.codebook.codes(windows)

    def generate_latents(self, masked, reference, windows, noise=None):
        """One-step generation of the target latents [B, F, C, h, w] from the masked target latents, the
        reference latents (both [B, F, C, h, w]) and the audio feature windows [B, F, W, n_mels]. `noise`
        (broadcastable to the latents; default fresh Gaussian noise) is the flow's t = 1 end point."""
        audio, codes = self.audio_features(windows)
        if noise is None:
            noise = torch.randn_like(masked)
        return self.one_step(noise, masked, reference, audio, codes)

    def one_step(self, noise, masked, reference, audio, codes):
        """x = unet(noise, masked, reference, audio, codes, t=1, r=0): the MeanFlow jump from t = 1 (noise)
        to r = 0 (data) in one step; noise is broadcast to the latents' shape [B, F, C, h, w]."""
        t = torch.ones(masked.shape[0], device=masked.device, dtype=masked.dtype)
        noise = noise.to(masked.dtype).expand_as(masked)
        return self.unet(noise, masked, reference, audio, codes, t, torch.zeros_like(t))

    # ---- checkpoint ----------------------------------------------------------------------------------

    def save(self, path):
        """Write config + weights to `path` atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        state = {"format": CHECKPOINT_FORMAT, "config": self.config.to_dict(),
                 "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}
        atomic_save(state, path)

    @classmethod
    def load(cls, path, map_location="cpu"):
        """The model saved by `save` (its config comes from the file). ValueError on a file that is not one."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path} is not a file")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as error:  # pickle, zip and torch errors alike: not a checkpoint of ours
            raise ValueError(f"{path} is not a MuseTalk checkpoint ({type(error).__name__}: {error})") from error
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a MuseTalk checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
        config = ModelConfig.from_dict(state["config"])
        pretrained, config.vae.pretrained = config.vae.pretrained, None  # the weights come from the file
        model = cls(config)
        model.load_state_dict(state["state_dict"])
        config.vae.pretrained = pretrained
        return model

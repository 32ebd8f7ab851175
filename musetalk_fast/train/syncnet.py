"""A small SyncNet: does this lower face move with this audio? Trained contrastively, then frozen as
the generator's lip-sync loss (Wav2Lip's "expert discriminator", Prajwal et al. 2020, with a CLIP-style
InfoNCE objective, Radford et al. 2021, in place of its cosine BCE).

Two encoders map to unit embeddings of width `dim`:
    visual  the lower half of the face at frame i and `visual_context` frames each side (stacked on
            channels; at the ends of the F frames given, the end frame repeats), cropped to where the
            mouth is in a face crop (`crop`: the top three quarters, the middle half of the width) and
            resized to `face_size`
    audio   the log-mel window of frame i [window_mels, n_mels] (+-context video frames of audio)
Their cosine times a learned scale is the sync logit. Training (`contrastive_loss`) asks each frame's
visual embedding to pick its own audio window among the other windows of the batch, with the windows
of the same clip at offsets -k..k as hard negatives (k = `offsets`). A candidate window identical to the
right one (silence is silence) is no negative and is left out. `sync_loss` is the same objective on
generated frames against the batch's own windows, differentiable w.r.t. the frames.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.config import ModelConfig


@dataclass
class SyncNetConfig:
    crop: tuple = (0.0, 0.75, 0.25, 0.75)  # (top, bottom, left, right) of the lower face kept, in fractions
    face_size: tuple = (48, 64)            # (height, width) the crop is resized to
    visual_context: int = 1                # frames each side of the centre frame the visual encoder sees
    visual_channels: tuple = (32, 64, 128)  # one stride-2 conv per entry
    audio_channels: int = 128
    dim: int = 128                         # embedding width
    offsets: int = 3                       # k: in-clip offsets +-k are the hard negatives and the accuracy's candidates


IDENTICAL_WINDOW_TOL = 1e-4  # windows closer than this (max abs difference of log-mels) are the same audio


def _norm(channels):
    return nn.GroupNorm(min(8, channels), channels)


class SyncNet(nn.Module):
    def __init__(self, config: ModelConfig, sync: SyncNetConfig = None):
        super().__init__()
        self.config, self.sync = config, sync or SyncNetConfig()
        sync, audio = self.sync, config.audio
        layers, channels = [], 3 * (2 * sync.visual_context + 1)
        height, width = sync.face_size
        for out in sync.visual_channels:
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), _norm(out), nn.SiLU()]
            channels, height, width = out, (height + 1) // 2, (width + 1) // 2
        self.visual = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * height * width, sync.dim))
        c = sync.audio_channels
        self.audio = nn.Sequential(
            nn.Conv1d(audio.n_mels, c, 3, padding=1), _norm(c), nn.SiLU(),
            nn.Conv1d(c, c, 3, padding=1), _norm(c), nn.SiLU(),
            nn.Flatten(), nn.Linear(c * audio.window_mels, sync.dim))
        # per-mel standardisation of the log-mels, set from the training data (fit_audio_stats)
        self.register_buffer("audio_mean", torch.zeros(audio.n_mels))
        self.register_buffer("audio_std", torch.ones(audio.n_mels))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # the InfoNCE inverse temperature, learned

    @property
    def scale(self):
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def fit_audio_stats(self, windows):
        """Set the log-mel standardisation from training windows [..., n_mels]."""
        flat = windows.reshape(-1, windows.shape[-1]).double()
        self.audio_mean.copy_(flat.mean(0))
        self.audio_std.copy_(flat.std(0).clamp_min(1e-3))

    def prepare_faces(self, frames):
        """Lower faces [..., 3, h, w] (any size) -> the encoder's input [..., 3, *face_size]: crop, then resize
        (antialiased bilinear; differentiable)."""
        height, width = frames.shape[-2:]
        top, bottom, left, right = self.sync.crop
        x = frames[..., round(top * height):round(bottom * height), round(left * width):round(right * width)]
        x = x.reshape(-1, *x.shape[-3:]).float()
        x = F.interpolate(x, size=self.sync.face_size, mode="bilinear", align_corners=False, antialias=True)
        return x.reshape(*frames.shape[:-2], *x.shape[-2:])

    def embed_frames(self, frames, prepared=False):
        """frames [B, F, 3, h, w] (lower halves of faces, any size, values in [-1, 1]; or, with prepared=True,
        the output of prepare_faces) -> unit [B, F, dim]."""
        check_frames(frames, "frames")
        batch, count = frames.shape[:2]
        if prepared and tuple(frames.shape[-2:]) != tuple(self.sync.face_size):
            raise ValueError(f"prepared frames must be [B, F, 3, {self.sync.face_size[0]}, {self.sync.face_size[1]}] "
                             f"(face_size; got {tuple(frames.shape)})")
        x = frames.float() if prepared else self.prepare_faces(frames)
        c = self.sync.visual_context
        offsets = torch.arange(-c, c + 1, device=x.device)
        neighbours = (torch.arange(count, device=x.device)[:, None] + offsets[None]).clamp(0, count - 1)
        x = x[:, neighbours].flatten(2, 3).flatten(0, 1)  # [B * F, (2c + 1) * 3, H, W]
        return F.normalize(self.visual(x), dim=-1).reshape(batch, count, -1)

    def embed_audio(self, windows):
        """windows [B, F, window_mels, n_mels] log-mels -> unit [B, F, dim]."""
        check_windows(windows, self.config.audio, "windows")
        batch, count = windows.shape[:2]
        x = (windows.float() - self.audio_mean.float()) / self.audio_std.float()
        x = x.flatten(0, 1).transpose(1, 2)  # [B * F, n_mels, window_mels]
        return F.normalize(self.audio(x), dim=-1).reshape(batch, count, -1)

    def forward(self, frames, windows):
        """Sync logits [B, F] of each frame with its own window (scale * cosine)."""
        return self.scale * (self.embed_frames(frames) * self.embed_audio(windows)).sum(-1)


def check_frames(frames, name):
    if not torch.is_tensor(frames) or not frames.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [B, F, 3, h, w] (got {_describe(frames)})")
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"{name} must have shape [B, F, 3, h, w] (got {tuple(frames.shape)})")
    if min(frames.shape) == 0:
        raise ValueError(f"{name} must not be empty (got shape {tuple(frames.shape)})")


def check_windows(windows, audio, name):
    if not torch.is_tensor(windows) or not windows.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [B, F, window_mels, n_mels] "
                         f"(got {_describe(windows)})")
    expected = (audio.window_mels, audio.n_mels)
    if windows.dim() != 4 or tuple(windows.shape[2:]) != expected:
        raise ValueError(f"{name} must have shape [B, F, {expected[0]}, {expected[1]}] (window_mels, n_mels of the "
                         f"config; got {tuple(windows.shape)})")
    if min(windows.shape) == 0:
        raise ValueError(f"{name} must not be empty (got shape {tuple(windows.shape)})")


def _describe(value):
    return f"{value.dtype} tensor" if torch.is_tensor(value) else type(value).__name__


def lower_half(frames):
    """The lower half of face crops [..., H, W]: the part the generator inpaints and the SyncNet reads."""
    return frames[..., frames.shape[-2] // 2:, :]


def info_nce(visual, audio, windows, positives, scale):
    """Cross-entropy of each visual embedding [N, D] over the candidate audio embeddings [M, D]
    (logits scale * cosine), the right one at index positives [N]. Candidates whose log-mel window
    (windows [M, ...]) is identical to the right one are left out: they are the same audio, no negative."""
    flat = windows.flatten(1).float()
    same = (flat[positives][:, None] - flat[None]).abs().amax(-1) <= IDENTICAL_WINDOW_TOL
    same[torch.arange(len(positives), device=positives.device), positives] = False
    logits = (scale * visual.float() @ audio.float().T).masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, positives)


def contrastive_loss(syncnet, frames, windows, prepared=False, heard=None):
    """The SyncNet's training loss. frames [B, F, 3, h, w] (prepared: see SyncNet.embed_frames); windows
    [B, F + 2k, W, n_mels]: the windows of the clip's frames s - k .. s + F - 1 + k around the F frames
    s .. s + F - 1, so that every frame's in-clip offsets +-k are candidates (with every other window of the
    batch). `heard` (same shape as windows; default windows) is what the audio encoder gets, e.g. augmented
    windows; which candidates are the same audio is decided on `windows`."""
    k = syncnet.sync.offsets
    batch, count = frames.shape[:2]
    if windows.shape[:2] != (batch, count + 2 * k):
        raise ValueError(f"windows must have shape [B, F + 2k, ...] = [{batch}, {count + 2 * k}, ...] for frames "
                         f"{tuple(frames.shape)} and offsets k = {k} (got {tuple(windows.shape)})")
    visual = syncnet.embed_frames(frames, prepared).flatten(0, 1)
    audio = syncnet.embed_audio(windows if heard is None else heard).flatten(0, 1)
    positives = (torch.arange(batch)[:, None] * (count + 2 * k) + k + torch.arange(count)[None]).flatten()
    return info_nce(visual, audio, windows.flatten(0, 1).to(visual.device), positives.to(visual.device), syncnet.scale)


def sync_loss(syncnet, lower_face_frames, windows):
    """The generator's lip-sync loss: InfoNCE of each generated frame's lower face against every audio
    window of the batch, its own window the right answer (the SyncNet's training objective, the batch's
    other frames of the same clip being the in-clip offsets). lower_face_frames [B, F, 3, h, w] in [-1, 1]
    (`lower_half` of the decoded frames; any size, resized), windows [B, F, W, n_mels]. Differentiable
    w.r.t. the frames; the caller freezes the SyncNet (`load_syncnet` returns it frozen). Needs B * F >= 2."""
    check_frames(lower_face_frames, "lower_face_frames")
    check_windows(windows, syncnet.config.audio, "windows")
    if lower_face_frames.shape[:2] != windows.shape[:2]:
        raise ValueError(f"lower_face_frames and windows must have the same [B, F] (got "
                         f"{tuple(lower_face_frames.shape[:2])} and {tuple(windows.shape[:2])})")
    if lower_face_frames.shape[0] * lower_face_frames.shape[1] < 2:
        raise ValueError("sync_loss needs at least two frames in the batch (B * F >= 2): the other windows are "
                         f"the negatives (got [B, F] = {list(lower_face_frames.shape[:2])})")
    visual = syncnet.embed_frames(lower_face_frames).flatten(0, 1)
    with torch.no_grad():
        audio = syncnet.embed_audio(windows).flatten(0, 1)
    positives = torch.arange(len(visual), device=visual.device)
    return info_nce(visual, audio, windows.flatten(0, 1), positives, syncnet.scale.detach())


def syncnet_state(syncnet, metrics=None):
    return {"format": CHECKPOINT_FORMAT, "model_config": syncnet.config.to_dict(), "syncnet_config": asdict(syncnet.sync),
            "state_dict": syncnet.state_dict(), "metrics": metrics or {}}


CHECKPOINT_FORMAT = "musetalk_fast.syncnet/1"


def load_syncnet(path, map_location="cpu"):
    """A SyncNet saved by `musetalk-fast train-syncnet`, frozen (no gradients to its weights) in eval mode."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a SyncNet checkpoint (format {CHECKPOINT_FORMAT})")
    sync = SyncNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["syncnet_config"].items()})
    syncnet = SyncNet(ModelConfig.from_dict(state["model_config"]), sync)
    syncnet.load_state_dict(state["state_dict"])
    return syncnet.requires_grad_(False).eval()

"""The trainer's data: clips of a data folder encoded once into latents (in memory), and a sampler that
draws training windows from them with its own random generator (its state is the data position that
a checkpoint saves).

Each training sample is F = config.clip_frames consecutive frames of one clip: the target latents,
their lower-half-masked latents (one set per Dynamic Margin Sampling margin), one informative
reference latent per frame (sampling.reference_candidates), the log-mel windows, the audio codes,
the target pixels and the mouth boxes. Windows that hold a frame label cleaning dropped are never drawn.
"""
from dataclasses import dataclass

import numpy as np
import torch

from .sampling import POSE_POOL, clean_labels, pose_features, reference_candidates, sample_margin, speech_energy_db


@dataclass
class TrainClip:
    identity: str
    name: str
    frames: np.ndarray      # uint8 [T, S, S, 3] at config.image_size
    latents: torch.Tensor   # float32 [T, C, h, w] (normalised)
    masked: dict            # margin in pixels -> float32 [T, C, h, w]: latents of the frames masked from that margin
    windows: torch.Tensor   # float32 [T, W, n_mels]
    codes: torch.Tensor     # int64 [T]
    mouth_box: np.ndarray   # float32 [T, 4] pixels of the S x S frame
    keep: np.ndarray        # bool [T]: frames label cleaning kept
    candidates: np.ndarray  # int64 [T, k]: informative reference candidates


@torch.no_grad()
def encode_clips(model, clips, margins=(0,), batch=32, clean=True, pose_pool=POSE_POOL):
    """TrainClips of FolderClips (musetalk_fast.model.folder.read_folder at config.image_size, with ground truth;
    boxes in pixels of that size): frames through the
    model's VAE (the frame, and the frame masked with each margin), audio to log-mel windows. The codebook
    must be fitted (fit_codebook); each frame's reference candidates come from its `pose_pool` closest poses
    (sampling.reference_candidates). Returns (clips, label-cleaning counts summed over them)."""
    from ..model.audio import audio_features, frame_windows
    from ..model.vae import mask_lower_half, to_model_images

    config = model.config
    totals = {"speech_closed": 0, "silent_open": 0, "kept": 0, "frames": 0}
    out = []
    for clip in clips:
        if not clip.truth:
            raise ValueError(f"clip {clip.identity}/{clip.name} has no ground truth (<clip>.json): the trainer's "
                             f"reference sampling and label cleaning read it")
        count = len(clip.frames)
        if clip.frames.shape[1] != config.image_size:
            raise ValueError(f"clip frames must be {config.image_size} px (read_folder(root, config.image_size))")
        images = to_model_images(clip.frames)
        latents = _encode(model, images, batch)
        masked = {margin: _encode(model, mask_lower_half(images, margin), batch) for margin in margins}
        windows = frame_windows(audio_features(clip.audio, config.audio), count, config.audio).float()
        mouth_open = clip.truth["mouth"][:, 0]
        if clean:
            keep, counts = clean_labels(speech_energy_db(clip.audio, count), mouth_open)
        else:
            keep = np.ones(count, bool)
            counts = {"speech_closed": 0, "silent_open": 0, "kept": count, "frames": count}
        for key in totals:
            totals[key] += counts[key]
        candidates = reference_candidates(pose_features(clip.truth), mouth_open, pose_pool=pose_pool)
        codes = model.codebook.codes(windows[None])[0]
        out.append(TrainClip(clip.identity, clip.name, clip.frames, latents.float(), masked, windows, codes,
                             np.asarray(clip.truth["mouth_box"], np.float32), keep, candidates))
    return out, totals


def _encode(model, images, batch):
    """Latents of images [N, 3, S, S] in eval mode: a freshly loaded model is in train mode, whose encoder
    differs in the last bits, and stage 2 must encode what stage 1 did (exact resume)."""
    from ..model.vae import encode

    model.vae.eval()
    return torch.cat([encode(model.vae, model.latent_stats, images[i:i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def add_margins(model, clips, margins, batch=32):
    """TrainClips (encode_clips) with the masked latents of every margin in `margins` (Dynamic Margin
    Sampling), encoding only those missing: stage 2 reuses stage 1's encoding when the VAE is the same."""
    from dataclasses import replace

    from ..model.vae import mask_lower_half, to_model_images

    out = []
    for clip in clips:
        missing = [m for m in margins if m not in clip.masked]
        images = to_model_images(clip.frames) if missing else None
        masked = {**clip.masked, **{m: _encode(model, mask_lower_half(images, m), batch) for m in missing}}
        out.append(replace(clip, masked={m: masked[m] for m in sorted(set(margins) | set(clip.masked))}))
    return out


@torch.no_grad()
def fit_codebook(model, clips, seed=0):
    """Fit the model's k-means audio codebook on the log-mel windows of the training clips."""
    from ..model.audio import audio_features, frame_windows

    config = model.config
    windows = [frame_windows(audio_features(c.audio, config.audio), len(c.frames), config.audio) for c in clips]
    model.codebook.fit(torch.cat(windows).float(), seed=seed)


class ClipSampler:
    """Draws training batches from TrainClips with a numpy Generator of its own: `state_dict()` is the
    data position (the generator's state and the count of samples drawn), saved with every checkpoint."""

    def __init__(self, clips, frames, seed=0):
        self.clips, self.frames = clips, frames
        self.starts = []  # (clip index, first frame) of every window whose frames label cleaning all kept
        for index, clip in enumerate(clips):
            kept = np.convolve(clip.keep.astype(np.int64), np.ones(frames, np.int64), mode="valid") == frames
            self.starts.extend((index, int(start)) for start in np.flatnonzero(kept))
        if not self.starts:
            raise ValueError(f"no window of {frames} consecutive kept frames in the training clips")
        self.rng = np.random.default_rng(seed)
        self.drawn = 0

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state, "drawn": self.drawn}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]
        self.drawn = state["drawn"]

    def draw(self, batch, max_margin=0):
        """A batch dict of tensors: x, masked, reference [B, F, C, h, w]; windows [B, F, W, n_mels]; codes [B, F];
        pixels float [B, F, 3, S, S] in [-1, 1]; mouth_box [B, F, 4]; margin [B] (pixels)."""
        rows = {key: [] for key in ("x", "masked", "reference", "windows", "codes", "pixels", "mouth_box", "margin")}
        for _ in range(batch):
            index, start = self.starts[int(self.rng.integers(len(self.starts)))]
            clip = self.clips[index]
            frames = np.arange(start, start + self.frames)
            choice = self.rng.integers(0, clip.candidates.shape[1], self.frames)
            references = clip.candidates[frames, choice]
            margin = sample_margin(self.rng, max_margin) if max_margin else 0
            margin = max(m for m in clip.masked if m <= margin)
            rows["x"].append(clip.latents[frames])
            rows["masked"].append(clip.masked[margin][frames])
            rows["reference"].append(clip.latents[references])
            rows["windows"].append(clip.windows[frames])
            rows["codes"].append(clip.codes[frames])
            rows["pixels"].append(torch.from_numpy(clip.frames[frames]).permute(0, 3, 1, 2).float() / 127.5 - 1)
            rows["mouth_box"].append(torch.from_numpy(clip.mouth_box[frames]))
            rows["margin"].append(torch.tensor(margin))
        self.drawn += batch
        return {key: torch.stack(values) for key, values in rows.items()}


def mouth_mask(mouth_box, size, grow=4):
    """float [B, F, 1, S, S]: 1 inside each frame's mouth box grown by `grow` pixels, 0 elsewhere."""
    rows = torch.arange(size, dtype=torch.float32, device=mouth_box.device)
    box = mouth_box.float()
    inside_y = (rows >= box[..., 1:2] - grow) & (rows < box[..., 3:4] + grow)
    inside_x = (rows >= box[..., 0:1] - grow) & (rows < box[..., 2:3] + grow)
    return (inside_y[..., :, None] & inside_x[..., None, :]).float().unsqueeze(-3)

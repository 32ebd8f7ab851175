"""Training the SyncNet on talking-head clips, and its held-out measure: picking the right audio offset.

`train_syncnet(clips, config)` takes clips with frames uint8 [T, H, W, 3] (square face crops), 16 kHz audio
and per-frame ground truth (`speaking`, for the report), in memory (data.generate_clips) or read from a
data folder. Each step draws B pieces of config.clip_frames consecutive frames (the generator's span, so
the visual encoder sees the same ends of a clip as under `sync_loss`) with the log-mel windows of their
frames and of k more frames each side (the in-clip offsets, hard negatives), and takes an AdamW step on
`contrastive_loss`. Augmentation, per piece, so that faces and voices of other identities look familiar:
the faces' colour (gain and offset per RGB channel, +-20 %), the audio's level (+-10 dB: +-0.25 on the
log10 / 4 scale of log_mel) and its spectral envelope (the mel bins shifted by up to 2, a crude change of
vocal-tract length).

`offset_accuracy` (Wav2Lip's offset test, Prajwal et al. 2020): for every frame with k frames each side,
the SyncNet ranks the audio windows of offsets -k..k; it is right when its pick is the frame's own window,
or one identical to it (in silence every offset is the same audio). Chance is the mean over frames of
(windows identical to the right one) / (2k + 1).
"""
import math
import time

import numpy as np
import torch

from ..model.audio import frame_windows, log_mel
from .syncnet import IDENTICAL_WINDOW_TOL, SyncNet, SyncNetConfig, contrastive_loss, lower_half


def prepare_clip(clip, syncnet):
    """A clip's tensors for the SyncNet: lower faces [T, 3, H, W] in [-1, 1] (SyncNet.prepare_faces),
    log-mel windows [T, window_mels, n_mels] and `speaking` [T] (ones when the clip has no ground truth)."""
    frames = torch.tensor(np.asarray(clip.frames)).permute(0, 3, 1, 2)  # a copy: read-only arrays welcome
    faces = syncnet.prepare_faces(lower_half(frames).float() / 127.5 - 1)
    audio = syncnet.config.audio
    windows = torch.as_tensor(frame_windows(log_mel(clip.audio, audio), len(frames), audio)).float()
    speaking = clip.truth.get("speaking") if clip.truth else None
    speaking = torch.ones(len(frames)) if speaking is None else torch.as_tensor(np.asarray(speaking)).float()
    return {"faces": faces, "windows": windows, "speaking": speaking}


def _pieces(prepared, count, k):
    """(clip index, first frame) pairs where count frames and k more windows each side fit."""
    return [(i, s) for i, clip in enumerate(prepared) for s in range(k, len(clip["faces"]) - count - k + 1)]


def augment(frames, windows, generator):
    """Random per-piece colour changes of frames [B, F, 3, H, W] and level / mel shifts of windows [B, M, W, n]."""
    batch = frames.shape[0]
    gain = 1 + 0.2 * (2 * torch.rand(batch, 1, 3, 1, 1, generator=generator) - 1)
    offset = 0.2 * (2 * torch.rand(batch, 1, 3, 1, 1, generator=generator) - 1)
    frames = (frames * gain + offset).clamp(-1, 1)
    level = 0.25 * (2 * torch.rand(batch, 1, 1, 1, generator=generator) - 1)
    shifts = torch.randint(-2, 3, (batch,), generator=generator)
    bins = windows.shape[-1]
    index = (torch.arange(bins)[None] - shifts[:, None]).clamp(0, bins - 1)  # [B, n]: edge bins repeat
    windows = torch.gather(windows, 3, index[:, None, None].expand_as(windows)) + level
    return frames, windows


def train_syncnet(clips, config, sync=None, steps=300, batch=16, lr=1e-3, seed=0, progress=False, log_every=50):
    """Train a SyncNet on `clips`; returns (syncnet in eval mode, history {"step", "loss"} every log_every steps)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    if batch < 1:
        raise ValueError(f"batch must be >= 1 (got {batch})")
    torch.manual_seed(seed)
    syncnet = SyncNet(config, sync or SyncNetConfig())
    k, count = syncnet.sync.offsets, config.clip_frames
    prepared = [prepare_clip(clip, syncnet) for clip in clips]
    pieces = _pieces(prepared, count, k)
    if not pieces:
        raise ValueError(f"clips must hold a clip of at least clip_frames + 2 * offsets = {count + 2 * k} frames")
    syncnet.fit_audio_stats(torch.cat([clip["windows"] for clip in prepared]))
    optimizer = torch.optim.AdamW(syncnet.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = np.random.default_rng(seed)
    torch_generator = torch.Generator().manual_seed(seed)
    history = {"step": [], "loss": []}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="step", desc="train-syncnet")
    syncnet.train()
    running = []
    for step in range(steps):
        chosen = [pieces[j] for j in generator.integers(len(pieces), size=batch)]
        frames = torch.stack([prepared[i]["faces"][s:s + count] for i, s in chosen])
        windows = torch.stack([prepared[i]["windows"][s - k:s + count + k] for i, s in chosen])
        frames, heard = augment(frames, windows, torch_generator)
        loss = contrastive_loss(syncnet, frames, windows, prepared=True, heard=heard)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(syncnet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history["step"].append(step + 1)
            history["loss"].append(float(np.mean(running)))
            running = []
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    return syncnet.eval(), history


@torch.no_grad()
def offset_accuracy(syncnet, clips, k=None):
    """Held-out accuracy of picking the right audio offset among -k..k (module docstring), over all frames
    and over speaking frames, with the chance level; k defaults to the SyncNet's `offsets`."""
    k = syncnet.sync.offsets if k is None else k
    right, chance, speaking = [], [], []
    for clip in clips:
        prepared = clip if isinstance(clip, dict) else prepare_clip(clip, syncnet)
        count = len(prepared["faces"])
        if count < 2 * k + 1:
            continue
        visual = syncnet.embed_frames(prepared["faces"][None], prepared=True)[0]
        audio = syncnet.embed_audio(prepared["windows"][None])[0]
        centres = torch.arange(k, count - k)
        candidates = centres[:, None] + torch.arange(-k, k + 1)[None]          # [N, 2k + 1]
        scores = (visual[centres, None] * audio[candidates]).sum(-1)
        windows = prepared["windows"].flatten(1)
        same = (windows[candidates] - windows[centres, None]).abs().amax(-1) <= IDENTICAL_WINDOW_TOL
        right.append(same.gather(1, scores.argmax(1, keepdim=True))[:, 0])
        chance.append(same.float().mean(1))
        speaking.append(prepared["speaking"][centres] > 0)
    if not right:
        raise ValueError(f"clips must hold a clip of at least 2 * k + 1 = {2 * k + 1} frames")
    right, chance, speaking = torch.cat(right).float(), torch.cat(chance), torch.cat(speaking)
    return {"offset_accuracy": right.mean().item(), "chance": chance.mean().item(),
            "offset_accuracy_speaking": right[speaking].mean().item() if speaking.any() else float("nan"),
            "chance_speaking": chance[speaking].mean().item() if speaking.any() else float("nan"),
            "offsets": k, "frames": len(right)}


def timed_training(train_clips, heldout_clips, config, **options):
    """train_syncnet then offset_accuracy on the held-out clips; returns (syncnet, report dict)."""
    start = time.perf_counter()
    syncnet, history = train_syncnet(train_clips, config, **options)
    seconds = time.perf_counter() - start
    report = {**offset_accuracy(syncnet, heldout_clips), "train_seconds": seconds, "history": history,
              "train_clips": len(train_clips), "heldout_clips": len(heldout_clips)}
    return syncnet, report


def run_train_syncnet(data, out, config, steps=300, batch=16, seed=0, heldout="val", force=False, progress=True):
    """`musetalk-fast train-syncnet`: train on the 'train' identities of the data folder `data`, measure the
    offset accuracy on its `heldout` split, write the frozen-ready checkpoint to `out` (atomically, with the
    report in its "metrics") and return the report. Bad input raises TrainArgumentError naming the argument."""
    from pathlib import Path

    from ..model.folder import read_folder
    from ..files import atomic_save
    from .pipeline import TrainArgumentError
    from .syncnet import syncnet_state

    for name, value in (("steps", steps), ("batch", batch)):
        if value < 1:
            raise TrainArgumentError(name, f"must be >= 1 (got {value})")
    out = Path(out)
    if out.is_dir():
        raise TrainArgumentError("out", f"{out} is a folder (a checkpoint file is written)")
    if out.exists() and not force:
        raise TrainArgumentError("out", f"{out} already exists; pass --force to overwrite it")
    try:
        clips = list(read_folder(data, config.image_size))
    except ValueError as error:
        raise TrainArgumentError("data", str(error).removeprefix("data ")) from error
    train = [clip for clip in clips if clip.split == "train"]
    held = [clip for clip in clips if clip.split == heldout]
    for split, members in (("train", train), (heldout, held)):
        if not members:
            raise TrainArgumentError("data", f"{data} has no clip of a {split!r} identity (manifest.json splits)")
    syncnet, report = timed_training(train, held, config, steps=steps, batch=batch, seed=seed, progress=progress)
    report["heldout_split"] = heldout
    atomic_save(syncnet_state(syncnet, report), out)
    return report

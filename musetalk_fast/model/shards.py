"""`musetalk-fast prepare`: precompute what training reads per frame into .npy shards and a manifest.

    <out>/manifest.json                       format, config, the VAE and its latent statistics, every clip
    <out>/codebook.safetensors                the AudioCodebook fitted on the train split's windows
    <out>/<identity>/<clip>/latents.npy       float32 [T, 16, h, w]  normalised latents of the frames
    <out>/<identity>/<clip>/masked.npy        float32 [T, 16, h, w]  ... of the frames with the lower half masked
    <out>/<identity>/<clip>/windows.npy       float32 [T, W, C]      audio feature windows (frame_windows)
    <out>/<identity>/<clip>/codes.npy         int64 [T]              audio codes
    <out>/<identity>/<clip>/frames.npy        uint8 [T, S, S, 3]     the frames at the model's image size
    <out>/<identity>/<clip>/audio_rms.npy     float32 [T]            RMS of each frame's 640 audio samples
    <out>/<identity>/<clip>/<truth>.npy       per-frame ground truth when the data has it: mouth [T, 5]
        (open, width, round, teeth, tongue), viseme, speaking, eyes_open, pose [T, 6], face_box, mouth_box,
        mouth_centre (pixels of the S x S frame)

The masked latents use margin 0 (stage 1); stage 2's Dynamic Margin Sampling re-encodes frames.npy with the
VAE at its sampled margin. Nothing is overwritten without force; with force only the files an earlier
manifest of this format lists are removed. Bad input raises DataArgumentError naming data, vae or out.
"""
import json
from pathlib import Path

import numpy as np
import torch

from ..data import DataArgumentError
from ..data.dataset import prepare_output
from .audio import AudioCodebook, audio_features, frame_windows
from .vae import encode, load_vae, mask_lower_half, to_model_images

FORMAT = "musetalk_fast.shards/1"
MANIFEST = "manifest.json"
CODEBOOK = "codebook.safetensors"


def _prepare_output(out, force):
    """The data writer's check (a writable folder, empty unless force), then, with force, the removal of the
    files an earlier shard manifest there lists."""
    out = prepare_output(out, force)
    manifest = out / MANIFEST
    if force and manifest.is_file():
        try:
            previous = json.loads(manifest.read_text())
            listed = [f"{entry['dir']}/{name}.npy" for entry in previous["clips"] for name in entry["arrays"]] + \
                [CODEBOOK] if previous.get("format") == FORMAT else []  # another tool's manifest: left alone
        except (ValueError, KeyError, TypeError, AttributeError):
            listed = []
        for relative in listed:
            path = (out / relative).resolve()
            if out.resolve() in path.parents and path.is_file():
                path.unlink()
                for parent in (path.parent, path.parent.parent):
                    if parent != out.resolve() and parent.is_dir() and not any(parent.iterdir()):
                        parent.rmdir()
    return out


@torch.no_grad()
def _latents(vae, stats, images, batch, masked):
    parts = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        parts.append(encode(vae, stats, mask_lower_half(chunk) if masked else chunk))
    return torch.cat(parts).numpy().astype(np.float32)


def prepare_shards(data, vae_folder, out, config, force=False, progress=True, batch=16):
    """Write the shards of every clip of the data folder `data` (model/folder.py) with the VAE folder
    `vae_folder` (train-vae's output); returns the manifest (also out/manifest.json)."""
    from safetensors.torch import save_file

    from .folder import read_folder

    if not Path(data).is_dir():
        raise DataArgumentError("data", f"{data} is not a folder")
    try:
        vae, stats = load_vae(vae_folder, config)
    except ValueError as error:
        raise DataArgumentError("vae", str(error).removeprefix("vae.pretrained ").removeprefix("vae ")) from error
    vae.eval()
    clips = read_folder(data, config.image_size)
    try:
        first = next(clips)
    except ValueError as error:  # no clips, or a clip ffmpeg cannot read: the message names the file
        raise DataArgumentError("data", str(error).removeprefix("data ")) from error
    out = _prepare_output(out, force)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="clip", desc="prepare")
    entries, windows_of = [], {}
    samples_per_frame = config.audio.sample_rate // 25
    for clip in _chain(first, clips):
        folder = out / clip.identity / clip.name
        folder.mkdir(parents=True, exist_ok=True)
        frames = len(clip.frames)
        images = to_model_images(clip.frames)
        audio = np.pad(clip.audio, (0, max(0, frames * samples_per_frame - clip.audio.size)))
        arrays = {"latents": _latents(vae, stats, images, batch, masked=False),
                  "masked": _latents(vae, stats, images, batch, masked=True),
                  "windows": frame_windows(audio_features(clip.audio, config.audio), frames,
                                           config.audio).numpy().astype(np.float32),
                  "frames": clip.frames,
                  "audio_rms": np.sqrt(np.mean(audio[:frames * samples_per_frame].reshape(frames, -1) ** 2, 1)
                                       ).astype(np.float32),
                  **clip.truth}
        for name, array in arrays.items():
            np.save(folder / f"{name}.npy", array)
        windows_of[len(entries)] = arrays["windows"]
        entries.append({"identity": clip.identity, "clip": clip.name, "split": clip.split, "num_frames": frames,
                        "audio_seconds": round(clip.audio.size / config.audio.sample_rate, 4),
                        "dir": f"{clip.identity}/{clip.name}",
                        "arrays": {name: [list(a.shape), str(a.dtype)] for name, a in arrays.items()}})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    # The codebook: k-means on the train split's windows (all clips when the folder has no split).
    fit_on = [windows_of[k] for k, e in enumerate(entries) if e["split"] == "train"] or list(windows_of.values())
    codebook = AudioCodebook(config, input_dim=fit_on[0].shape[-1]).fit(torch.from_numpy(np.concatenate(fit_on)))
    for k, entry in enumerate(entries):
        codes = codebook.codes(torch.from_numpy(windows_of[k])[None])[0].numpy()
        np.save(out / entry["dir"] / "codes.npy", codes)
        entry["arrays"]["codes"] = [list(codes.shape), str(codes.dtype)]
    save_file({k: v.contiguous() for k, v in codebook.state_dict().items()}, str(out / CODEBOOK))
    manifest = {"format": FORMAT, "data": str(Path(data).resolve()), "vae": str(Path(vae_folder).resolve()),
                "config": config.to_dict(), "latent_stats": stats.to_dict(),
                "audio_features": "whisper" if config.audio.whisper else "log_mel", "codebook": CODEBOOK,
                "mask_margin": 0, "clips": entries}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _chain(first, rest):
    yield first
    yield from rest


def load_manifest(root):
    """The manifest of a shard folder (checked to be one)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ValueError(f"shards {root} has no {MANIFEST} (write one with `musetalk-fast prepare`)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"shards {root}: {MANIFEST} is not a {FORMAT} manifest")
    return manifest


def load_clip(root, entry, mmap=True):
    """{name: array} of one manifest clip entry (memory-mapped by default)."""
    folder = Path(root) / entry["dir"]
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None) for name in entry["arrays"]}


def load_codebook(root, config):
    """The AudioCodebook a shard folder was written with."""
    from safetensors.torch import load_file

    state = load_file(str(Path(root) / CODEBOOK))
    codebook = AudioCodebook(config, input_dim=state["mean"].numel() // config.audio.mels_per_frame)
    codebook.load_state_dict(state)
    return codebook

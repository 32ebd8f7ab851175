"""Clips of a data folder (the synthetic layout of docs/data.md, or real clips in it) for the model's commands:
frames at the model's image size, 16 kHz audio, the per-frame ground truth when a <clip>.json is beside the
video (boxes scaled to the image size), and the split of the folder's manifest.json."""
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.clips import FORMAT, POSE_FIELDS
from ..data.face import SIZE
from ..data.real import read_clip, scan_folder
from ..data.visemes import MOUTH_PARAMS


@dataclass
class FolderClip:
    identity: str
    name: str
    split: str          # "train", "val", "test" from the manifest; "train" when the folder has none
    frames: np.ndarray  # uint8 [T, S, S, 3] RGB at the model's image size
    audio: np.ndarray   # float32 [N] mono 16 kHz
    truth: dict         # per-frame arrays (truth_arrays) or {} for clips without ground truth


def truth_arrays(document, image_size, num_frames):
    """Per-frame ground-truth arrays of a <clip>.json, boxes and centres in pixels of the image_size frame."""
    columns = document["frames"]
    scale = image_size / SIZE
    arrays = {"mouth": np.stack([columns[f"mouth_{n}"] for n in MOUTH_PARAMS], 1).astype(np.float32),
              "viseme": np.asarray(columns["viseme"], np.int64), "speaking": np.asarray(columns["speaking"], np.int64),
              "eyes_open": np.asarray(columns["eyes_open"], np.float32),
              "pose": np.stack([columns[n] for n in POSE_FIELDS], 1).astype(np.float32),
              "face_box": np.asarray(columns["face_box"], np.float32) * scale,
              "mouth_box": np.asarray(columns["mouth_box"], np.float32) * scale,
              "mouth_centre": np.asarray(columns["mouth_centre"], np.float32) * scale}
    return {name: value[:num_frames] for name, value in arrays.items()}


def read_folder(root, image_size, splits=None):
    """Yield the FolderClip of every clip under `root` (sorted), only those of `splits` when given. Raises
    ValueError naming the folder when it is missing or holds no clip."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data {root} is not a folder")
    split_of = {}
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            document = json.loads(manifest.read_text())
            if document.get("format") == FORMAT:
                split_of = {name: split for split, names in document["splits"].items() for name in names}
        except (ValueError, KeyError, AttributeError):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # length mismatches: frame_windows pads/cuts the audio per frame
        clips, _ = scan_folder(root)
    if not clips:
        raise ValueError(f"data {root} holds no clips (<identity>/<clip>.mp4 with a .wav or an audio stream)")
    for clip in clips:
        split = split_of.get(clip.identity, "train")
        if splits is not None and split not in splits:
            continue
        frames, audio = read_clip(clip, size=image_size)
        truth_path = clip.video.with_suffix(".json")
        truth = {}
        if truth_path.is_file():
            truth = truth_arrays(json.loads(truth_path.read_text()), image_size, len(frames))
        yield FolderClip(clip.identity, clip.name, split, frames, audio, truth)

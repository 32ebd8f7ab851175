"""Evaluation of a talking-head generator on held-out synthetic clips, measured in the generated pixels.

`evaluate(generate_fn, clips)` calls `generate_fn(clip) -> uint8 [T, H, W, 3]` on each clip (data.Clip:
frames, audio, ground truth) and measures the generated mouths with the data package's detector
(`musetalk_fast.data.realism.mouth_gap_pixels`: the inner-lip gap in pixels, read from the pixels):

- opening_correlation: Pearson r of the measured gap with the ground-truth `mouth_open`, per clip, the
  mean over clips (and the min). The detector looks inside the ground-truth mouth box made as tall as
  the clip's tallest box around the frame's mouth centre (`measurement_boxes`): the box of a frame grows
  with its opening, so with the box as given a mouth drawn open in every frame reads "wider" where the
  truth is wide (r ~ 0.8 for a copied open reference). With one height per clip only the pixels say how
  open the mouth is.
- opening_std_ratio: std of the measured gap over the std of the gap measured on the ground-truth
  frames, per clip, the mean over clips. Read it beside the correlation: a mouth that barely moves has a ratio ~0, and its small
  wobbles can still correlate (a static frame under the moving head reads a gap varying by ~1 px with
  the pose, and the synthetic head nods with speech).
- silent_closed_share: of the frames with ground-truth `speaking == 0`, the share whose generated mouth
  is closed: a measured gap at most CLOSED_FRACTION of the identity's measured range above the bottom of
  that range (the range: min and 99th percentile of the gap measured on that identity's ground-truth
  frames in `clips`). Relative, so it holds for small and wide mouths and at any resolution.
- mouth_psnr, mouth_ssim: PSNR (dB) and SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, per RGB
  channel, averaged; train/image_losses.py) of the generated vs ground-truth frame in the mouth region
  (`mouth_crops`: one size per clip, the largest measurement box grown by MOUTH_MARGIN pixels on each side,
  centred on the frame's box), per frame, averaged. Identical pixels give PSNR_CAP.
- fps: generated frames per second of wall time spent inside generate_fn.

run_eval (`musetalk-fast eval`) also reports "vae_reconstruction": the same metrics of the clips' own frames
encoded and decoded by the model's VAE (generation.reconstruction_generator): what a generator that found
the true latents would score through that VAE (at the tiny config's 128 px, a VAE that darkens an identity's
closed lips past the detector's threshold holds silent_closed_share down for that identity unless the U-Net
finds other latents that decode lighter).

Generated frames of another size than the clip's are resized to it (bilinear) before measuring.
"""
import time

import cv2
import numpy as np
import torch

from ..data.realism import _correlation as pearson
from ..data.realism import mouth_gap_pixels
from .image_losses import psnr, ssim

CLOSED_FRACTION = 0.1  # closed: gap <= bottom + 0.1 * (range) of the identity's measured opening
MOUTH_MARGIN = 8       # pixels around the mouth box for PSNR/SSIM
PSNR_CAP = 100.0       # dB, for identical pixels


def measurement_boxes(truth):
    """The ground-truth mouth boxes [T, 4] made as tall as the clip's tallest box: each frame's box spans
    the clip's largest extents above and below the frame's mouth centre (the lips' rest line, which does
    not move with the opening), at the frame's own horizontal extent."""
    boxes = np.array(truth["mouth_box"], np.float64)
    centre_y = np.asarray(truth["mouth_centre"], np.float64)[:, 1]
    above, below = (centre_y - boxes[:, 1]).max(), (boxes[:, 3] - centre_y).max()
    boxes[:, 1], boxes[:, 3] = centre_y - above, centre_y + below
    return boxes


def measure_gap(frames, truth):
    return mouth_gap_pixels(frames, measurement_boxes(truth), np.asarray(truth["mouth_centre"]))


def closed_threshold(truth_gaps):
    """The gap (pixels) at or below which a mouth counts as closed, from gaps measured on ground-truth frames."""
    bottom, top = np.min(truth_gaps), np.percentile(truth_gaps, 99)
    return bottom + CLOSED_FRACTION * (top - bottom)


def mouth_crops(frames, truth):
    """uint8 [T, h, w, 3]: per frame, the region of one size per clip (the largest measurement box grown by
    MOUTH_MARGIN on each side) centred on the frame's measurement box, kept inside the frame."""
    boxes = measurement_boxes(truth)
    frame_height, frame_width = frames.shape[1:3]
    width = min(int(np.ceil((boxes[:, 2] - boxes[:, 0]).max())) + 2 * MOUTH_MARGIN, frame_width)
    height = min(int(np.ceil((boxes[:, 3] - boxes[:, 1]).max())) + 2 * MOUTH_MARGIN, frame_height)
    x0 = np.clip(np.round((boxes[:, 0] + boxes[:, 2] - width) / 2).astype(int), 0, frame_width - width)
    y0 = np.clip(np.round((boxes[:, 1] + boxes[:, 3] - height) / 2).astype(int), 0, frame_height - height)
    return np.stack([frame[y:y + height, x:x + width] for frame, x, y in zip(frames, x0, y0)])


def mouth_quality(generated, truth):
    """Per-frame (PSNR in dB capped at PSNR_CAP, SSIM) [T] of two uint8 crop stacks [T, h, w, 3]
    (image_losses.psnr and .ssim, on [-1, 1] pixels)."""
    pair = [torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1
            for crops in (generated, truth)]
    return psnr(*pair).clamp(max=PSNR_CAP).numpy(), ssim(*pair).numpy()


def _check_generated(generated, clip):
    expected = (len(clip.frames), 3)
    if not isinstance(generated, np.ndarray) or generated.dtype != np.uint8 or generated.ndim != 4 \
            or (generated.shape[0], generated.shape[3]) != expected:
        shape = getattr(generated, "shape", None)
        raise ValueError(f"generate_fn must return uint8 RGB frames [T={expected[0]}, H, W, 3] as a numpy array for "
                         f"clip {clip.identity}/{clip.name} (got {type(generated).__name__} "
                         f"{getattr(generated, 'dtype', '')} {tuple(shape) if shape is not None else ''})")
    height, width = clip.frames.shape[1:3]
    if generated.shape[1:3] != (height, width):
        generated = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in generated])
    return generated


def evaluate(generate_fn, clips):
    """The metrics of the module docstring over `clips` (data.Clip objects with ground truth)."""
    clips = list(clips)
    if not clips:
        raise ValueError("clips must hold at least one clip")
    truth_gaps, seconds, results = {}, 0.0, []
    for clip in clips:
        start = time.perf_counter()
        generated = generate_fn(clip)
        seconds += time.perf_counter() - start
        generated = _check_generated(generated, clip)
        truth_gap = measure_gap(clip.frames, clip.truth)
        truth_gaps.setdefault(clip.identity, []).append(truth_gap)
        gap = measure_gap(generated, clip.truth)
        quality = np.stack(mouth_quality(mouth_crops(generated, clip.truth), mouth_crops(clip.frames, clip.truth)), 1)
        results.append({"clip": clip, "gap": gap, "truth_gap": truth_gap, "quality": quality})
    thresholds = {name: closed_threshold(np.concatenate(gaps)) for name, gaps in truth_gaps.items()}
    correlations = [pearson(r["gap"], r["clip"].truth["mouth_open"]) for r in results]
    closed = np.concatenate([r["gap"][~np.asarray(r["clip"].truth["speaking"], bool)] <= thresholds[r["clip"].identity]
                             for r in results])
    quality = np.concatenate([r["quality"] for r in results])
    std_ratios = [r["gap"].std() / r["truth_gap"].std() for r in results if r["truth_gap"].std() > 0]
    frames = sum(len(r["gap"]) for r in results)
    return {
        "opening_correlation": float(np.mean(correlations)),
        "opening_correlation_min": float(np.min(correlations)),
        "opening_std_ratio": float(np.mean(std_ratios)) if std_ratios else float("nan"),
        "silent_closed_share": float(closed.mean()) if closed.size else float("nan"),
        "mouth_psnr": float(quality[:, 0].mean()),
        "mouth_ssim": float(quality[:, 1].mean()),
        "fps": frames / seconds if seconds > 0 else float("inf"),
        "clips": len(results),
        "frames": frames,
        "silent_frames": int(closed.size),
        "closed_threshold_px": {name: float(value) for name, value in sorted(thresholds.items())},
    }


REFERENCE_RULES = ("open", "first")
# run_eval's "vae_reconstruction": these metrics of the ground-truth frames through the model's VAE alone
CEILING_KEYS = ("opening_correlation", "opening_std_ratio", "silent_closed_share", "mouth_psnr", "mouth_ssim")


def reference_index(clip, rule="open"):
    """The clip's frame a generator gets as its reference (one per clip, so it cannot leak the mouth of the
    frame being generated): "open" the frame with the widest ground-truth opening (copying it keeps the mouth
    open in silence: the closed-mouth figure then measures what the audio made of it), "first" frame 0."""
    if rule not in REFERENCE_RULES:
        raise ValueError(f"reference rule must be one of {REFERENCE_RULES} (got {rule!r})")
    return int(np.argmax(clip.truth["mouth_open"])) if rule == "open" else 0



def run_eval(checkpoint, data, split="test", reference="open", seed=0, device=None):
    """`musetalk-fast eval`: the MuseTalk checkpoint's metrics on the `split` clips of a data folder, read at
    the data's own resolution (the generator resizes to its image size; evaluate resizes back). Bad input
    raises TrainArgumentError naming the argument."""
    from pathlib import Path

    from ..data.face import SIZE
    from ..model.folder import read_folder
    from ..model.musetalk import MuseTalk
    from .generation import clip_generator, reconstruction_generator
    from .pipeline import TrainArgumentError, eval_clip

    if not Path(data).is_dir():
        raise TrainArgumentError("data", f"{data} is not a folder")
    try:
        model = MuseTalk.load(checkpoint)
    except ValueError as error:
        raise TrainArgumentError("checkpoint", str(error)) from error
    try:
        clips = [eval_clip(clip) for clip in read_folder(data, SIZE, (split,)) if clip.truth]
    except ValueError as error:
        raise TrainArgumentError("data", str(error).removeprefix("data ")) from error
    if not clips:
        raise TrainArgumentError("data", f"{data} has no clip with ground truth (<clip>.json) in split {split!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    metrics = evaluate(clip_generator(model, seed=seed, reference_rule=reference), clips)
    ceiling = evaluate(reconstruction_generator(model), clips)
    metrics["vae_reconstruction"] = {key: ceiling[key] for key in CEILING_KEYS}
    return metrics

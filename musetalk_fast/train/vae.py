"""Train the 16-channel VAE on the frames of a data folder (`musetalk-fast train-vae`).

Loss per step, on a batch of crops (posterior samples decoded):
    L1 + mouth_weight * L1 inside the mouth box + ImageLoss (1 - MS-SSIM + gradient loss) + kl_weight * KL,
with the KL in Stable Diffusion's units (summed over the latent, per image, against the L1 summed over the
pixels: kl_weight = 1e-6 as SD's autoencoder). The mouth term and the gradient loss are what keep decoded
lips and teeth sharp; the small KL keeps the posterior a distribution without pulling detail out of it.

Crops: the VAE is convolutional, so it trains on crop_size crops (half the image by default: a quarter of
the cost per image), half of them placed over the mouth (when the folder has ground truth). It is evaluated
on whole held-out frames: PSNR of the image and of the mouth box, MS-SSIM.
After training, the latent statistics are measured on the training frames and saved with the weights
(model/vae.py save_vae), so `--out` is a folder build_vae / load_vae / `prepare --vae` read.
"""
import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..data import DataArgumentError
from ..data.dataset import prepare_output
from ..model.vae import build_vae, compute_latent_stats, save_vae, to_model_images
from .image_losses import ImageLoss, ms_ssim, psnr

REPORT = "train_vae.json"
MAX_COLOR_JITTER = 2.0  # gains up to e^2: beyond, most crops clamp to flat colour


@dataclass
class VAETraining:
    steps: int = 800
    batch: int = 8
    crop_size: int = None     # None: image_size // 2
    lr: float = 1e-3
    warmup: int = 20
    mouth_weight: float = 4.0
    kl_weight: float = 1e-6
    ssim_weight: float = 0.5
    gradient_weight: float = 1.0
    seed: int = 0
    initial_logvar: float = -8.0  # the posterior's log-variance at the start (see train_vae)
    max_minutes: float = None  # stop early (after the step that crosses it)
    color_jitter: float = 0.4  # per-crop random colour cast (see _jitter_colors); 0 = off (docs/model.md)


def _crop_origins(rng, count, size, crop, mouth_boxes):
    """Top-left corners of `count` crops; with boxes, half the crops contain the mouth box's centre region."""
    origins = rng.integers(0, size - crop + 1, (count, 2))
    if mouth_boxes is not None:
        over_mouth = rng.random(count) < 0.5
        cx = (mouth_boxes[:, 0] + mouth_boxes[:, 2]) / 2
        cy = (mouth_boxes[:, 1] + mouth_boxes[:, 3]) / 2
        jitter = rng.integers(-crop // 4, crop // 4 + 1, (count, 2))
        centred = np.stack([cy, cx], 1).round().astype(int) - crop // 2 + jitter
        origins = np.where(over_mouth[:, None], np.clip(centred, 0, size - crop), origins)
    return origins


def _mouth_weights(boxes, origins, crop, weight):
    """[N, 1, crop, crop] loss weights: 1 + weight inside the (cropped) mouth box."""
    rows = torch.arange(crop).view(1, -1, 1)
    cols = torch.arange(crop).view(1, 1, -1)
    b = torch.as_tensor(boxes, dtype=torch.float32)
    oy = torch.as_tensor(origins[:, 0]).view(-1, 1, 1)
    ox = torch.as_tensor(origins[:, 1]).view(-1, 1, 1)
    inside = ((rows + oy >= b[:, 1].view(-1, 1, 1)) & (rows + oy < b[:, 3].view(-1, 1, 1))
              & (cols + ox >= b[:, 0].view(-1, 1, 1)) & (cols + ox < b[:, 2].view(-1, 1, 1)))
    return (1 + weight * inside.float()).unsqueeze(1)


def _jitter_colors(images, strength, generator):
    """A random colour cast per image of [N, 3, H, W] in [-1, 1]: each channel c becomes
    g_c * x + o_c with log g_c ~ U(-s, s) and o_c ~ U(-s/2, s/2), clamped to [-1, 1].
    The training identities are a handful of skin and lip palettes; an autoencoder fit to them
    shifts an unseen face's colours toward them (a held-out identity's closed lips decoded as a dark
    gap). Casts make the decoder represent the colour it is given rather than recall a palette."""
    n = images.shape[0]
    gains = torch.exp((torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * strength)
    offsets = (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * strength
    return (images * gains + offsets).clamp(-1, 1)


def train_vae(config, frames, mouth_boxes=None, training=VAETraining(), progress=True, log=None):
    """Train a fresh VAE (build_vae(config)) on uint8 frames [N, S, S, 3] (S = config.image_size) with optional
    mouth boxes [N, 4] (x0, y0, x1, y1 pixels). Returns (vae, history: list of per-step loss dicts)."""
    size = config.image_size
    if frames.ndim != 4 or frames.shape[1:] != (size, size, 3):
        raise ValueError(f"frames must be uint8 [N, {size}, {size}, 3] (got {frames.shape})")
    crop = training.crop_size or size // 2
    if not 8 <= crop <= size or crop % 8:
        raise ValueError(f"crop_size must be a multiple of 8 in [8, {size}] (got {crop})")
    if not 0 <= training.color_jitter <= MAX_COLOR_JITTER:
        raise ValueError(f"color_jitter must be in [0, {MAX_COLOR_JITTER}] (got {training.color_jitter})")
    torch.manual_seed(training.seed)
    rng = np.random.default_rng(training.seed)
    jitter_rng = torch.Generator().manual_seed(training.seed)
    vae = build_vae(config).train()
    # A fresh encoder's posterior has log-variance ~0 (std 1) around means of ~0.1: sampled latents would be
    # almost pure noise and the decoder would learn slowly. Start the log-variance half of quant_conv's
    # output at initial_logvar (std 0.02); the KL term then moves it where it needs to be.
    with torch.no_grad():
        vae.quant_conv.bias[config.vae.latent_channels:] = training.initial_logvar
    optimizer = torch.optim.AdamW(vae.parameters(), lr=training.lr, weight_decay=0.0)
    # linear warm-up, then cosine down to a tenth
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / training.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / max(training.steps, 1), 1.0)))))
    image_loss = ImageLoss(ssim_weight=training.ssim_weight, gradient_weight=training.gradient_weight)
    all_frames = torch.from_numpy(np.ascontiguousarray(frames))
    history, start = [], time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=training.steps, unit="step", desc="train-vae")
    for step in range(training.steps):
        index = rng.integers(0, len(frames), training.batch)
        boxes = None if mouth_boxes is None else mouth_boxes[index]
        origins = _crop_origins(rng, training.batch, size, crop, boxes)
        crops = torch.stack([all_frames[i, y:y + crop, x:x + crop] for i, (y, x) in zip(index, origins)])
        target = to_model_images(crops.numpy())
        if training.color_jitter:
            target = _jitter_colors(target, training.color_jitter, jitter_rng)
        posterior = vae.encode(target).latent_dist
        decoded = vae.decode(posterior.sample()).sample
        error = (decoded - target).abs()
        l1 = error.mean()
        mouth = (error * (_mouth_weights(boxes, origins, crop, training.mouth_weight) - 1)).mean() \
            if boxes is not None else torch.zeros(())
        perceptual = image_loss(decoded, target)
        kl = training.kl_weight * posterior.kl().mean() / target[0].numel()
        loss = l1 + mouth + perceptual + kl
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train-vae: loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        record = {"step": step, "loss": loss.item(), "l1": l1.item(), "mouth": mouth.item(),
                  "image": perceptual.item(), "kl": kl.item(), "grad_norm": grad_norm.item(),
                  "seconds": time.perf_counter() - start}
        history.append(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            bar.update(1)
        if log is not None:
            log(record)
        if training.max_minutes is not None and record["seconds"] > 60 * training.max_minutes:
            break
    if bar is not None:
        bar.close()
    return vae.eval(), history


@torch.no_grad()
def evaluate_reconstruction(vae, frames, mouth_boxes=None, batch=8):
    """Reconstruction (posterior mean, decoded) of uint8 frames [N, S, S, 3]: mean PSNR (dB) of the images and
    of their mouth boxes, mean MS-SSIM."""
    image_psnr, mouth_psnr, similarity = [], [], []
    for start in range(0, len(frames), batch):
        images = to_model_images(frames[start:start + batch])
        decoded = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
        image_psnr += psnr(decoded, images).tolist()
        similarity += ms_ssim(decoded, images).tolist()
        if mouth_boxes is not None:
            for k, box in enumerate(mouth_boxes[start:start + batch]):
                x0, y0 = np.floor(box[:2]).astype(int).clip(0)
                x1, y1 = np.ceil(box[2:]).astype(int)
                region = (slice(None), slice(y0, y1), slice(x0, x1))
                mouth_psnr.append(psnr(decoded[k][region][None], images[k][region][None]).item())
    result = {"frames": len(frames), "psnr_db": float(np.mean(image_psnr)), "ms_ssim": float(np.mean(similarity))}
    if mouth_psnr:
        result["mouth_psnr_db"] = float(np.mean(mouth_psnr))
    return result


def _gather(clips):
    frames = np.concatenate([clip.frames for clip in clips])
    boxes = None
    if all(clip.truth for clip in clips):
        boxes = np.concatenate([clip.truth["mouth_box"][:len(clip.frames)] for clip in clips])
    return frames, boxes


def run_train_vae(data, config, out, training=VAETraining(), force=False, progress=True, eval_frames=64):
    """The train-vae command: read the folder, train, evaluate on held-out frames (the val/test identities of
    the manifest, else every 10th frame), measure latent statistics, save to `out`. Returns the report.
    Bad input raises DataArgumentError naming data, out or crop_size, before anything is written."""
    from ..model.folder import read_folder

    crop = training.crop_size or config.image_size // 2
    if not 8 <= crop <= config.image_size or crop % 8:
        raise DataArgumentError("crop_size", f"must be a multiple of 8 in [8, {config.image_size}] (got {crop})")
    if not 0 <= training.color_jitter <= MAX_COLOR_JITTER:
        raise DataArgumentError("color_jitter", f"must be in [0, {MAX_COLOR_JITTER}] (got {training.color_jitter})")
    try:
        clips = list(read_folder(data, config.image_size))
    except ValueError as error:  # not a folder, no clips, or a clip ffmpeg cannot read (named)
        raise DataArgumentError("data", str(error).removeprefix("data ")) from error
    out = prepare_output(out, force)  # a writable folder, empty unless force (data/dataset.py)
    train = [c for c in clips if c.split == "train"]
    held = [c for c in clips if c.split != "train"]
    frames, boxes = _gather(train or clips)
    if held:
        eval_set, eval_boxes = _gather(held)
    else:  # no held-out identities: every 10th frame is held out
        keep = np.arange(len(frames)) % 10 != 9
        eval_set, eval_boxes = frames[~keep], None if boxes is None else boxes[~keep]
        frames, boxes = frames[keep], None if boxes is None else boxes[keep]
    pick = np.linspace(0, len(eval_set) - 1, min(eval_frames, len(eval_set))).round().astype(int)
    eval_set, eval_boxes = eval_set[pick], None if eval_boxes is None else eval_boxes[pick]
    start = time.perf_counter()
    vae, history = train_vae(config, frames, boxes, training, progress=progress)
    seconds = time.perf_counter() - start
    metrics = evaluate_reconstruction(vae, eval_set, eval_boxes)
    batches = (to_model_images(frames[i:i + 16]) for i in range(0, len(frames), 16))
    stats = compute_latent_stats(vae, batches)
    save_vae(out, vae, stats)
    report = {"data": str(data), "config": config.to_dict(), "training": asdict(training),
              "train_frames": int(len(frames)), "held_out": "val/test identities" if held else "every 10th frame",
              "steps": len(history), "train_seconds": seconds, "final_loss": history[-1]["loss"],
              "eval": metrics, "history": history}
    (out / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    return report

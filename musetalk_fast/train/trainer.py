"""The two-stage trainer of the MuseTalk model (issue 14), one loop read top to bottom in `train_stage`.

Stage 1 (reconstruction): the pixel-MeanFlow loss on the U-Net's x-prediction (meanflow.py), plus, on
the decoded pixels, the image loss (MS-SSIM + gradient, or LPIPS with local VGG weights: image_losses.py)
of the rows with t < 0.8 (pMF applies its perceptual loss only there: at larger t the x-prediction is a
blur of many images) and of the one-step rows (t, r) = (1, 0) (inpainting's condition makes that image
no blur; their pMF target is x itself, as pMF's residual at t = 1 ignores x_pred: compute_losses), an L1 on the whole decoded
image and an L1 on its mouth region (at t = 1, the one-step generation of inference, the mouth can only
come from the audio). The Engram memory is frozen (its gate
stays at zero, so the U-Net learns without it). References come from Informative Frame Sampling.
Stage 2 (refinement): from the stage-1 model, the Engram unfrozen, the frozen SyncNet's lip-sync loss
added with a weight ramped linearly from 0, and Dynamic Margin Sampling of the mask; pMF kept.
`objective="l1"` (the comparison row) replaces pMF in both stages by MuseTalk 1.5's one-step L1 regression
(one_step_l1); the pixel losses stay.

Both: AdamW with a linear warm-up, gradient clipping, EMA weights (evaluated and saved), bf16 autocast
(CPU too; `bf16=False` turns it off), gradient checkpointing, optional Transformer Engine fp8 linears, a
NaN/Inf guard that stops with the step and the offending loss, a progress bar with ETA, periodic
evaluation on held-out identities (evaluate.py: the mouth measured in the generated pixels), atomic
checkpoints with exact resume (checkpoint.py), and a report (report.json + report.png).

    RUN/stage<k>/checkpoint.pt   the training state (resume)
    RUN/stage<k>/model.pt        the EMA model (MuseTalk.save), what `generate`/`eval` load
    RUN/report.json, report.png  curves and metrics of every stage run into RUN
"""
import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint, resume, save_checkpoint
from .data import ClipSampler, mouth_mask
from .ema import EMA
from .meanflow import pmf_loss, sample_times
from .precision import autocast, use_fp8_linears
from .report import History, write_report
from .sampling import POSE_POOL


MAX_SEED = (2 ** 32 - 1) // 1000 - 2  # stage k seeds numpy with seed * 1000 + k, which must stay below 2^32


@dataclass
class TrainOptions:
    """Hyperparameters (defaults sized for the tiny config on a CPU)."""
    batch: int = 4
    lr: float = 1e-3                # stage 1's peak learning rate
    stage2_lr: float = 3e-4         # stage 2's: it fine-tunes stage 1's EMA weights (1e-3 undid them)
    betas: tuple = (0.9, 0.99)
    weight_decay: float = 0.01
    warmup: int = 20                # steps of linear learning-rate warm-up
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    bf16: bool = True               # autocast to bfloat16 (CPU and GPU)
    grad_checkpointing: bool = True
    fp8: bool = False               # Transformer Engine fp8 linears when importable
    objective: str = "pmf"          # "pmf" (pixel MeanFlow) or "l1": MuseTalk 1.5's one-step L1 regression
    perceptual_vgg: str = None      # local torchvision vgg16 weights: LPIPS replaces MS-SSIM + gradient
    perceptual_lpips: str = None    # local LPIPS vgg.pth (its learned channel weights; needs perceptual_vgg)
    equal_share: float = 0.9        # share of rows with r = t (MeanFlow: 0.75 on ImageNet; docs/train.md: why 0.9)
    time_mean: float = -0.4         # logit-normal (t, r) sampler
    time_std: float = 1.0
    one_step_share: float = 0.1     # rows drawn at (t, r) = (1, 0): the one-step generation, all inference runs
    one_step_target: str = "x"      # their pMF target: "x" (V = u, regress on x) or "pmf" (the JVP's; see compute_losses)
    image_weight: float = 1.0       # MS-SSIM + gradient (or LPIPS) on decoded pixels: rows with t < image_t_max
    image_t_max: float = 0.8        # and the one-step rows (see compute_losses)
    image_samples: int = 2          # samples per step decoded for the image, L1, mouth and sync losses
    mouth_weight: float = 4.0       # L1 on the mouth box of the decoded pixels
    l1_weight: float = 1.0          # L1 on the whole decoded image (MuseTalk 1.5's reconstruction term)
    sync_weight: float = 0.1        # stage 2: the SyncNet loss, ramped from 0 over sync_ramp of the steps
    sync_ramp: float = 0.5
    indexer_weight: float = 0.01    # the temporal attention's indexer KL loss (DSA), when the U-Net reports one
    reference_pose_pool: int = POSE_POOL  # Informative Frame Sampling: references among this many closest poses
    max_margin: int = 16            # stage 2: Dynamic Margin Sampling's largest extra mask margin (pixels)
    checkpoint_every: int = 25
    eval_every: int = 0             # 0: evaluate at the end of the stage only
    eval_clips: int = 4
    seed: int = 0
    margins: tuple = field(default=(0, 8, 16))  # the masked latents precomputed per margin

    def __post_init__(self):
        for name in ("perceptual_vgg", "perceptual_lpips"):  # a Path would not survive options.json
            if getattr(self, name) is not None:
                setattr(self, name, str(getattr(self, name)))
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}] (got {self.seed})")
        if self.objective not in ("pmf", "l1"):
            raise ValueError(f"objective must be 'pmf' or 'l1' (got {self.objective!r})")
        if self.perceptual_lpips is not None and self.perceptual_vgg is None:
            raise ValueError("perceptual_lpips needs perceptual_vgg (the VGG16 its channel weights apply to)")
        if self.one_step_target not in ("x", "pmf"):
            raise ValueError(f"one_step_target must be 'x' or 'pmf' (got {self.one_step_target!r})")
        if self.reference_pose_pool < 1:
            raise ValueError(f"reference_pose_pool must be at least 1 (got {self.reference_pose_pool})")

    def to_dict(self):
        return asdict(self)


# what a resumed run must share with the checkpoint's: the loss and the model's modules
RESUME_FIXED = ("objective", "fp8", "perceptual_vgg", "perceptual_lpips")


class ResumeMismatchError(ValueError):
    """--resume with options that change the loss or the modules of the checkpoint's run."""


class NonFiniteLossError(FloatingPointError):
    """A loss or the gradient norm became NaN or Inf: training stops, naming the step and the loss."""

    def __init__(self, step, name, value):
        super().__init__(f"step {step}: loss '{name}' is {value} (not finite); training stopped, the last checkpoint "
                         f"is the one before it")
        self.step, self.name, self.value = step, name, value


def trainable_modules(model):
    return torch.nn.ModuleDict({"unet": model.unet, "audio_encoder": model.audio_encoder})


def set_stage(model, stage):
    """Stage 1: the Engram frozen; stage 2: everything of the U-Net and audio encoder trains. The VAE,
    its latent statistics and the codebook never train."""
    model.vae.requires_grad_(False).eval()
    trainable_modules(model).requires_grad_(True).train()
    if stage == 1:
        for parameter in model.unet.engram_parameters():
            parameter.requires_grad_(False)


def flow_times(batch, options):
    """(t, r) [B]: logit-normal with a share of r = t (meanflow.sample_times), and a share of rows at
    exactly (1, 0), the one-step generation of inference. The "l1" objective trains only that one step."""
    if options.objective == "l1":
        return torch.ones(batch), torch.zeros(batch)
    t, r = sample_times(batch, mean=options.time_mean, std=options.time_std, equal_share=options.equal_share)
    one_step = torch.rand(batch) < options.one_step_share
    return torch.where(one_step, torch.ones_like(t), t), torch.where(one_step, torch.zeros_like(r), r)


def compute_losses(model, batch, t, r, eps, options, image_loss, syncnet=None, sync_weight=0.0, fp8=None):
    """The losses of one batch (a dict of scalars) and the U-Net's indexer loss if any. `fp8`: the fp8
    linears' context (precision.use_fp8_linears), turned off for the JVP's finite-difference forwards."""
    from ..model.vae import decode

    from ..model.vae import lower_half_mask

    unet = model.unet
    audio = model.audio_encoder(batch["windows"])
    extra = {}
    # the latent rows each sample's mask covers (Dynamic Margin Sampling moves its top up by margin // 8 rows)
    size = batch["x"].shape[-1]
    mask = lower_half_mask(size, batch["margin"].cpu() // 8).to(batch["x"].device).unsqueeze(1)  # [B, 1, 1, h, w]

    def predict_x(z, tt, rr, rows=None):
        pick = slice(None) if rows is None else rows
        tokens = audio[pick] if rows is None else audio[pick].detach()
        # the finite differences (rows given) divide output differences by h = 1e-4: no fp8 rounding there
        exact = fp8(enabled=False) if fp8 is not None and rows is not None else contextlib.nullcontext()
        with exact:
            x = unet(z, batch["masked"][pick], batch["reference"][pick], tokens, batch["codes"][pick], tt, rr,
                     mask=mask[pick])
        if rows is None:  # the finite-difference calls that follow overwrite the indexer's loss
            extra["indexer"] = unet.indexer_loss()
        return x

    one_step = (t == 1) & (r == 0)
    # At (1, 0) the pMF residual is -dx_pred/dt whatever x_pred is (meanflow.py): a constant output scores 0,
    # and a run has kept the untrained network's flat field there (docs/train.md). "x" gives those
    # rows the r = t target, ||x_pred - x||^2: the conditional mean, which the image losses below sharpen.
    if options.objective == "l1":
        out = one_step_l1(predict_x, batch["x"], eps)
        losses = {"latent_l1": out["loss"]}
    else:
        boundary = one_step if options.one_step_target == "x" else None
        out = pmf_loss(predict_x, batch["x"], eps, t, r, boundary_rows=boundary)
        losses = {"pmf": out["loss"]}
    # Decoding is the step's dearest part (at 128 px the VAE decoder costs more per frame than the tiny
    # U-Net): options.image_samples samples of the (i.i.d.) batch are decoded, the one-step rows (t, r) =
    # (1, 0) first. The image loss takes those with t < image_t_max (pMF's perceptual range, where x_pred is
    # an image, not a blur of many) and the one-step rows; the L1s and the sync loss take all of them.
    # Inpainting is conditioned on the visible upper half and the reference, so the one-step image is no
    # blur; the image, L1 and mouth losses teach it in pixels.
    near = (t < options.image_t_max) | one_step
    chosen = torch.argsort((~one_step).to(torch.int8), stable=True)[:options.image_samples]
    if chosen.numel():
        pixels = decode(model.vae, model.latent_stats, out["x_pred"][chosen]).float()
        target = batch["pixels"][chosen]
        picked = near[chosen]
        # the image losses in float32: MS-SSIM's ratios of small local variances underflow in bf16 (-inf seen)
        with torch.autocast(pixels.device.type, enabled=False):
            if picked.any():
                losses["image"] = image_loss(pixels[picked], target[picked])
            if options.l1_weight:
                losses["l1"] = (pixels - target).abs().mean()
            box = mouth_mask(batch["mouth_box"][chosen], target.shape[-1]).to(pixels.device)
            losses["mouth"] = ((pixels - target).abs() * box).sum() / (3 * box.sum()).clamp_min(1)
        if syncnet is not None and sync_weight > 0:
            from .syncnet import lower_half, sync_loss

            losses["sync"] = sync_loss(syncnet, lower_half(pixels), batch["windows"][chosen])
    if extra.get("indexer") is not None:
        losses["indexer"] = extra["indexer"]
    weights = {"pmf": 1.0, "latent_l1": 1.0, "image": options.image_weight, "mouth": options.mouth_weight,
               "l1": options.l1_weight, "sync": sync_weight, "indexer": options.indexer_weight}
    return losses, weights, out["mse"]


def one_step_l1(predict_x, x, eps):
    """MuseTalk 1.5's reconstruction (the "l1" objective, the comparison row of docs/train.md): the one-step
    generation x_pred = U-Net(z = eps, t = 1, r = 0), as inference runs it, regressed on the clean latent with
    an L1 loss; no flow, no JVP. The trainer adds the same L1, mouth and perceptual losses on decoded pixels.
    Returns pmf_loss's keys: loss, mse (per sample, detached; logged as one_step_mse), x_pred."""
    ones = torch.ones(x.shape[0], device=x.device, dtype=x.dtype)
    x_pred = predict_x(eps, ones, ones * 0)
    error = x_pred.float() - x.float()
    return {"loss": error.abs().mean(), "mse": error.detach().square().flatten(1).mean(1), "x_pred": x_pred}


def train_stage(model, stage, train_clips, eval_clips, out, steps, options, resume_run=False, syncnet=None,
                image_loss=None, progress=True, history=None, callback=None):
    """Train `model` (a MuseTalk) for stage 1 or 2 up to `steps` steps, checkpointing into out/stage<k>;
    returns the History. `callback(step)` runs after each step's checkpoint (tests inject a crash there)."""
    from tqdm import tqdm

    folder = Path(out) / f"stage{stage}"
    folder.mkdir(parents=True, exist_ok=True)
    history = history if history is not None else History()
    device = next(model.unet.parameters()).device
    if image_loss is None:
        from .image_losses import trainer_image_loss

        image_loss = trainer_image_loss(options.perceptual_vgg, options.perceptual_lpips)
    image_loss = image_loss.to(device)

    # --- the model, the optimizer and their schedule
    fp8, swapped = None, 0
    if options.fp8:  # before set_stage, which then freezes the swapped linears of the Engram in stage 1
        swapped, fp8 = use_fp8_linears(model.unet)
        history.info[f"stage{stage}_fp8_linears"] = swapped
    set_stage(model, stage)
    # torch.utils.checkpoint recomputes in the backward, outside the fp8 context: not with fp8 linears
    model.unet.gradient_checkpointing = options.grad_checkpointing and not swapped
    history.info[f"stage{stage}_grad_checkpointing"] = model.unet.gradient_checkpointing
    trainable = trainable_modules(model)
    parameters = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=options.lr if stage == 1 else options.stage2_lr,
                                  betas=tuple(options.betas),
                                  weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(options.warmup, 1)))
    ema = EMA(trainable, options.ema_decay)
    sampler = ClipSampler(train_clips, model.config.clip_frames, seed=options.seed * 1000 + stage)
    torch.manual_seed(options.seed * 1000 + stage)
    np.random.seed(options.seed * 1000 + stage)

    # --- resume: model, optimizer, EMA, schedule, data position and every random state
    step = 0
    checkpoint_path = folder / "checkpoint.pt"
    if resume_run and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path)
        saved = state["extra"].get("options", {})
        changed = [f"{k} {saved[k]!r} -> {getattr(options, k)!r}" for k in RESUME_FIXED
                   if k in saved and saved[k] != getattr(options, k)]
        if changed:
            raise ResumeMismatchError(f"{checkpoint_path} was trained with other options ({'; '.join(changed)}): "
                                      f"resume with the same ones, or start a new run folder")
        step = resume(state, model=model, optimizer=optimizer, ema=ema, scheduler=scheduler, sampler=sampler)
        history.load_state_dict(state["extra"]["history"])
        print(f"stage {stage}: resumed from {checkpoint_path} at step {step}")

    def save(at):
        save_checkpoint(checkpoint_path, step=at, model=model, optimizer=optimizer, ema=ema, scheduler=scheduler,
                        sampler=sampler, extra={"stage": stage, "options": options.to_dict(),
                                                "history": history.state_dict()})

    bar = tqdm(total=steps, initial=step, desc=f"stage {stage}", unit="step", disable=not progress, dynamic_ncols=True)
    while step < steps:
        started = time.perf_counter()
        # --- one batch: F frames of a clip each, informative references, (t, r), noise
        batch = sampler.draw(options.batch, max_margin=options.max_margin if stage == 2 else 0)
        batch = {k: v.to(device) for k, v in batch.items()}
        t, r = flow_times(options.batch, options)
        t, r = t.to(device), r.to(device)
        eps = torch.randn_like(batch["x"])
        sync_weight = 0.0
        if stage == 2 and syncnet is not None:
            sync_weight = options.sync_weight * min(1.0, step / max(options.sync_ramp * steps, 1))

        # --- forward: pMF + image + mouth (+ sync) losses
        with autocast(device, options.bf16), (fp8() if swapped else contextlib.nullcontext()):
            losses, weights, mse = compute_losses(model, batch, t, r, eps, options, image_loss, syncnet, sync_weight,
                                                  fp8=fp8 if swapped else None)
        total = sum(weights[name] * value.float() for name, value in losses.items())
        for name, value in [*losses.items(), ("total", total)]:
            if not torch.isfinite(value).all():
                raise NonFiniteLossError(step + 1, name, value.detach().item())

        # --- backward, clip, step, EMA
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_(parameters, options.grad_clip)
        if not torch.isfinite(norm):
            raise NonFiniteLossError(step + 1, "gradient norm", float(norm))
        optimizer.step()
        scheduler.step()
        ema.update(trainable)
        step += 1

        # --- log, checkpoint, evaluate
        seconds = time.perf_counter() - started
        history.log(step, stage, loss_total=total.item(), **{f"loss_{k}": v.item() for k, v in losses.items()},
                    **{f"{'pmf' if options.objective == 'pmf' else 'one_step'}_mse": mse.mean().item()},
                    grad_norm=norm.item(), lr=scheduler.get_last_lr()[0],
                    sync_weight=sync_weight, seconds=seconds)
        main = "pmf" if "pmf" in losses else "latent_l1"
        bar.set_postfix(loss=f"{total.item():.3f}", **{main: f"{losses[main].item():.3f}"})
        bar.update(1)
        if step % options.checkpoint_every == 0 or step == steps:
            save(step)
        if eval_clips and ((options.eval_every and step % options.eval_every == 0) or step == steps):
            metrics = evaluate_ema(model, ema, eval_clips)
            history.log_eval(step, stage, metrics)
            bar.write(f"stage {stage} step {step}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
            if step == steps:
                save(step)  # the final evaluation joins the checkpoint's history
        if callback is not None:
            callback(step)
    bar.close()

    # --- the EMA model, for generate / eval / stage 2
    ema_model(model, ema).save(folder / "model.pt")
    write_report(history, out, title=f"musetalk-fast train ({model.config.image_size} px, stage {stage})")
    return history


def evaluate_ema(model, ema, clips):
    """evaluate.py's metrics of the EMA weights on held-out clips (the mouth measured in generated pixels)."""
    from .evaluate import evaluate
    from .generation import clip_generator

    return evaluate(clip_generator(ema_model(model, ema).eval()), clips)


def ema_model(model, ema):
    """A copy of `model` (a MuseTalk) with the EMA weights in its trainable parts. Building it draws a random
    init, from a forked generator: evaluating leaves the training's random stream as it was."""
    with torch.random.fork_rng(devices=[]):
        copied = type(model)(model.config)
    # Transformer Engine linears (--fp8) carry an fp8 "_extra_state" the plain copy has no place for
    copied.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")})
    ema.copy_to(trainable_modules(copied))
    return copied.to(next(model.unet.parameters()).device)

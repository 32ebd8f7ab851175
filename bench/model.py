"""The model rows of `make bench` / `make gpu-check`: the MuseTalk U-Net on our ops against the same model
with the same weights on musetalk_fast/reference.py (musetalk_fast.ops.use_reference_ops).

    unet train step     forward + backward of the x-prediction loss (MSE to the clean latent, plus the
                        temporal indexer's KL loss), bf16 autocast over fp32 weights on a GPU; B clips of
                        clip_frames frames.
    pmf train step      the trainer's stage-1 step (train/trainer.py compute_losses with its defaults): audio
                        encoder, the U-Net forward, the pMF loss's finite-difference JVP (two more U-Net
                        forwards, on the one row with r < t; the other rows have r = t or are the one-step
                        row, as ~90 % of training rows are), VAE decode of two samples for the image, L1
                        and mouth losses, backward; the trainer's autocast, clips and gradient
                        checkpointing. Issue 14's goal (H100): ours >= 1.5x faster than reference ops.
    inference           one-step generation of 20 frames (one clip, F = 20, t = 1, r = 0) with the model in
                        bf16: audio encoding + U-Net + VAE decode to pixels; the row's items_per_s is FPS.

Default config on a GPU, tiny (float32) on the CPU. FLOPs (2 per multiply-add) are counted by
musetalk_fast.model.costs on the reference ops at the benchmark's shapes; the roofline is the matmul peak.
Issue 13's goals (H100): inference >= 200 FPS; train step ours >= 1.5x faster than reference ops (issue 14:
the same for the pmf train step).
"""
import copy

import torch

from musetalk_fast.model.config import ModelConfig
from musetalk_fast.model.costs import count_flops, unet_inputs
from musetalk_fast.model.unet import MuseTalkUNet
from musetalk_fast.ops import use_reference_ops

from .case import Case

INFERENCE_FRAMES = 20  # MuseTalk's real-time batch


def setting(device):
    """(config name, inference dtype, autocast dtype or None, training clips per step)."""
    if device == "cuda":
        return "default", torch.bfloat16, torch.bfloat16, 4
    return "tiny", torch.float32, None, 1


def on_reference_ops(fn):
    def run():
        with use_reference_ops():
            return fn()

    return run


def train_step(unet, inputs, target, device, autocast_dtype):
    """zero grads, forward under autocast, loss, backward (outside autocast, as a trainer does)."""
    def run():
        unet.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            x_pred = unet(**inputs)
            loss = torch.nn.functional.mse_loss(x_pred.float(), target)
            indexer = unet.indexer_loss()
            loss = loss if indexer is None else loss + indexer
        loss.backward()

    return run


class MediaParts:
    """The inference path's other parts (branch media's modules): the audio encoder and codebook, the VAE and
    its latent statistics, random-initialised (the timings do not depend on the weights)."""

    def __init__(self, config, device, dtype, generator):
        from musetalk_fast.model.audio import AudioCodebook, AudioEncoder
        from musetalk_fast.model.vae import LatentStats, build_vae

        audio = config.audio
        self.config = config
        self.encoder = AudioEncoder(config).to(device, dtype).eval()
        fit_windows = torch.randn(2 * audio.codes, 1, audio.window_mels, audio.n_mels, generator=generator)
        self.codebook = AudioCodebook(config).fit(fit_windows).to(device)
        self.vae = build_vae(config).to(device, dtype).eval()
        self.stats = LatentStats(config.vae.latent_channels).to(device)

    def random_windows(self, batch, frames, generator, device, dtype):
        audio = self.config.audio
        return torch.randn(batch, frames, audio.window_mels, audio.n_mels, generator=generator).to(device, dtype)


def fixed_times(clips):
    """(t, r) [clips] of the pmf step row: row 0 takes the JVP (t = 0.8, r = 0.3), the last row (clips > 1)
    is the one-step row (1, 0), the others have r = t (no JVP) at spread t."""
    t = torch.linspace(0.8, 0.3, clips)
    r = t.clone()
    r[0] = 0.3
    if clips > 1:
        t[-1], r[-1] = 1.0, 0.0
    return t, r


def perturb_zero_init(unet):
    """Trained-looking weights instead of the zero-initialised branches (a zero branch skips no work, but
    its gradients would be trivially zero)."""
    with torch.no_grad():
        for parameter in unet.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(0.0, 0.02)


def pmf_step_case(config, name, clips, device, autocast_dtype, generator):
    """(step fn, shape label) of the trainer's stage-1 step on a random-initialised MuseTalk and a random
    batch shaped as ClipSampler.draw's."""
    from musetalk_fast.model.musetalk import MuseTalk
    from musetalk_fast.train.image_losses import ImageLoss
    from musetalk_fast.train.trainer import TrainOptions, compute_losses, set_stage

    options = TrainOptions(batch=clips, bf16=autocast_dtype is not None)
    model = MuseTalk(config)
    perturb_zero_init(model.unet)
    set_stage(model, 1)
    model.unet.gradient_checkpointing = options.grad_checkpointing
    model = model.to(device)
    frames, size, audio = config.clip_frames, config.image_size, config.audio
    latent = (clips, frames, config.vae.latent_channels, config.latent_size, config.latent_size)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    box = torch.tensor([size // 4, size * 5 // 8, size * 3 // 4, size * 7 // 8])
    batch = dict(x=randn(*latent), masked=randn(*latent), reference=randn(*latent),
                 windows=randn(clips, frames, audio.window_mels, audio.n_mels),
                 codes=torch.randint(0, audio.codes, (clips, frames), generator=generator).to(device),
                 pixels=(torch.rand(clips, frames, 3, size, size, generator=generator) * 2 - 1).to(device),
                 mouth_box=box.expand(clips, frames, 4).to(device), margin=torch.zeros(clips, dtype=torch.int64))
    t, r = fixed_times(clips)
    t, r, eps = t.to(device), r.to(device), randn(*latent)
    image_loss = ImageLoss().to(device)

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            losses, weights, _ = compute_losses(model, batch, t, r, eps, options, image_loss)
        sum(weights[name] * value.float() for name, value in losses.items()).backward()

    precision = f"amp-{str(autocast_dtype).replace('torch.', '')}" if autocast_dtype else "float32"
    return run, f"{name} B={clips} F={frames} {size}px {precision}"


def generate_frames(unet, media, inputs):
    """Log-mel windows -> audio tokens and codes, the U-Net at t = 1, r = 0 from noise, VAE decode -> pixels."""
    from musetalk_fast.model.vae import decode

    def run():
        with torch.no_grad():
            tokens = media.encoder(inputs["windows"])
            codes = media.codebook.codes(inputs["windows"])
            z = inputs["z_t"]
            ones = torch.ones(z.shape[0], device=z.device, dtype=z.dtype)
            latents = unet(z, inputs["masked"], inputs["reference"], tokens, codes, ones, ones * 0)
            return decode(media.vae, media.stats, latents)

    return run


def cases(device, inference_frames=INFERENCE_FRAMES):
    name, dtype, autocast_dtype, clips = setting(device)
    config = ModelConfig.named(name)
    generator = torch.Generator().manual_seed(0)
    unet = MuseTalkUNet(config).to(device).train()
    perturb_zero_init(unet)

    frames = config.clip_frames
    inputs = unet_inputs(config, clips, frames, device, generator=generator)
    target = torch.randn(inputs["z_t"].shape, generator=generator).to(device)
    step = train_step(unet, inputs, target, device, autocast_dtype)
    step_flops = count_flops(step)
    step_shape = f"{name} B={clips} F={frames} {config.latent_size}^2 " + \
        (f"amp-{str(autocast_dtype).replace('torch.', '')}" if autocast_dtype else "float32")

    generator_unet = copy.deepcopy(unet).eval().to(dtype)
    media = MediaParts(config, device, dtype, generator)
    latent_inputs = unet_inputs(config, 1, inference_frames, device, dtype, generator)
    latent_inputs["windows"] = media.random_windows(1, inference_frames, generator, device, dtype)
    generate = generate_frames(generator_unet, media, latent_inputs)
    generate_flops = count_flops(generate)
    generate_shape = f"{name} F={inference_frames} {config.image_size}^2 {str(dtype).replace('torch.', '')}"

    pmf_step, pmf_shape = pmf_step_case(config, name, clips, device, autocast_dtype, generator)
    pmf_flops = count_flops(pmf_step)

    roofline = "bf16" if device == "cuda" else "fp32"
    return [
        Case("unet train step", step_shape, {"ours": step}, {"reference ops": on_reference_ops(step)},
             flops=step_flops, roofline=roofline),
        Case("pmf train step", pmf_shape, {"ours": pmf_step}, {"reference ops": on_reference_ops(pmf_step)},
             flops=pmf_flops, roofline=roofline),
        Case("inference audio+unet+vae", generate_shape, {"ours": generate},
             {"reference ops": on_reference_ops(generate)}, flops=generate_flops, roofline=roofline,
             items=inference_frames),
    ]

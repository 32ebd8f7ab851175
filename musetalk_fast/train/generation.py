"""One-step generation of a whole clip for evaluation: what evaluate.py's `generate_fn` calls.

Each frame's masked latent is the frame itself with its lower half masked (as at inference); the
reference is one frame per clip (evaluate.reference_index: the widest ground-truth opening, so that a
model copying its reference keeps the mouth open in silence and the metrics show it); the noise is
drawn once per clip (a fixed seed) and shared by its frames, as the inference path does; frames go
through the U-Net config.clip_frames at a time (the temporal attention's training span).
"""
import numpy as np
import torch


def clip_generator(model, seed=0, reference_rule="open"):
    """generate_fn(clip) -> uint8 [T, S, S, 3] with `model` (a MuseTalk) at t = 1, r = 0."""
    from ..model.audio import audio_features, frame_windows
    from ..model.vae import decode, encode, mask_lower_half, to_model_images, to_uint8
    from .evaluate import reference_index

    config = model.config
    device = next(model.unet.parameters()).device

    @torch.no_grad()
    def generate(clip):
        count = len(clip.frames)
        images = to_model_images(clip.frames, config.image_size).to(device)
        masked = torch.cat([encode(model.vae, model.latent_stats, mask_lower_half(images[i:i + 32]))
                            for i in range(0, count, 32)])
        index = reference_index(clip, reference_rule)
        reference = encode(model.vae, model.latent_stats, images[index:index + 1]).expand_as(masked)
        windows = frame_windows(audio_features(clip.audio, config.audio), count, config.audio).float().to(device)
        codes = model.codebook.codes(windows[None])[0]
        tokens = model.audio_encoder(windows[None])[0]
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(masked.shape[1:], generator=generator).to(device)
        frames = []
        span = config.clip_frames
        for start in range(0, count, span):
            part = slice(start, min(start + span, count))
            n = part.stop - part.start
            ones = torch.ones(1, device=device)
            x = model.unet(noise.expand(1, n, *noise.shape), masked[None, part], reference[None, part],
                           tokens[None, part], codes[None, part], ones, torch.zeros_like(ones))
            frames.append(to_uint8(decode(model.vae, model.latent_stats, x[0], clamp=True)))
        return np.concatenate(frames)

    return generate


def reconstruction_generator(model):
    """generate_fn(clip) -> uint8 [T, S, S, 3]: the clip's own frames through the model's VAE (encode, decode).
    evaluate() of it is what a generator that found the true latents would score through this VAE: the
    reference level for a generator decoding through it (not a strict bound: other latents may decode better)."""
    from ..model.vae import decode, encode, to_model_images, to_uint8

    config = model.config
    device = next(model.vae.parameters()).device

    @torch.no_grad()
    def reconstruct(clip):
        images = to_model_images(clip.frames, config.image_size).to(device)
        return np.concatenate([to_uint8(decode(model.vae, model.latent_stats,
                                               encode(model.vae, model.latent_stats, images[i:i + 32]), clamp=True))
                               for i in range(0, len(images), 32)])

    return reconstruct

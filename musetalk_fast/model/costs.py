"""Parameters and FLOPs of the U-Net (the numbers in its docstring and docs/model.md, and the benchmark's
TFLOP/s). FLOPs are counted by torch.utils.flop_counter on the reference ops (our kernels are opaque
to it; the reference does the same math as plain matmuls): 2 per multiply-add of the matmuls,
convolutions and attention products; elementwise work, norms and the Sinkhorn rounds are not counted.

    python -m musetalk_fast.model.costs [--config default] [--frames 8]
"""
import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..ops.backend import use_reference_ops


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def unet_inputs(config, batch, frames, device="cpu", dtype=torch.float32, generator=None):
    """Random inputs of MuseTalkUNet.forward for this config (t uniform, r in [0, t])."""
    size, audio = config.latent_size, config.audio
    latent = (batch, frames, config.vae.latent_channels, size, size)
    t = torch.rand(batch, generator=generator).to(device=device, dtype=dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return dict(z_t=randn(*latent), masked=randn(*latent), reference=randn(*latent),
                audio=randn(batch, frames, audio.window_mels, audio.dim),
                codes=torch.randint(0, audio.codes, (batch, frames), generator=generator).to(device),
                t=t, r=t * torch.rand(batch, generator=generator).to(device=device, dtype=dtype))


def count_flops(fn):
    """FLOPs of fn() (which may run a backward), on the reference ops."""
    counter = FlopCounterMode(display=False)
    with use_reference_ops(), counter:
        fn()
    return counter.get_total_flops()


def unet_forward_flops(unet, inputs):
    with torch.no_grad():
        return count_flops(lambda: unet(**inputs))


def main(argv=None):
    from .config import ModelConfig
    from .unet import MuseTalkUNet

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default")
    parser.add_argument("--frames", type=int, default=None, help="F (default: the config's clip_frames)")
    args = parser.parse_args(argv)
    config = ModelConfig.named(args.config)
    frames = args.frames or config.clip_frames
    unet = MuseTalkUNet(config).eval()
    engram = sum(p.numel() for p in unet.engram_join.engram.parameters())
    flops = unet_forward_flops(unet, unet_inputs(config, 1, frames))
    print(f"{args.config}: {count_parameters(unet) / 1e6:.1f} M parameters ({engram / 1e6:.1f} M of them the "
          f"Engram); {flops / frames / 1e9:.2f} GFLOP forward per frame (F = {frames})")


if __name__ == "__main__":
    main()

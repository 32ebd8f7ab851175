"""The VAE trainer's colour cast (train/vae.py _jitter_colors): one affine map per image and channel,
inside the stated ranges, reproducible from the generator's seed, and the identity at strength 0."""
import math

import pytest
import torch

from musetalk_fast.train.vae import _jitter_colors


def images(n, seed=0):
    # values in [-0.3, 0.3]: a cast of strength <= 0.4 keeps them inside [-1, 1] (no clamping to undo)
    return (torch.rand(n, 3, 16, 24, generator=torch.Generator().manual_seed(seed)) - 0.5) * 0.6


@pytest.mark.parametrize("strength", [0.1, 0.4])
def test_each_image_channel_gets_one_gain_and_offset_in_range(strength):
    x = images(7)
    y = _jitter_colors(x, strength, torch.Generator().manual_seed(3))
    assert y.shape == x.shape and y.dtype == x.dtype
    for image in range(7):
        for channel in range(3):
            a, b = x[image, channel].flatten(), y[image, channel].flatten()
            # least-squares fit b = g a + o: exact when the map is affine
            design = torch.stack([a, torch.ones_like(a)], 1).double()
            gain, offset = torch.linalg.lstsq(design, b.double().unsqueeze(1)).solution.flatten()
            assert torch.allclose(gain * a.double() + offset, b.double(), atol=1e-6)
            assert math.exp(-strength) - 1e-6 <= gain <= math.exp(strength) + 1e-6
            assert abs(offset) <= strength / 2 + 1e-6


def test_casts_differ_between_images_and_repeat_with_the_seed():
    x = images(1).repeat(4, 1, 1, 1)  # four copies of one image
    first = _jitter_colors(x, 0.4, torch.Generator().manual_seed(5))
    again = _jitter_colors(x, 0.4, torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    assert not torch.allclose(first[0], first[1]) and not torch.allclose(first[2], first[3])


def test_output_stays_in_the_model_range_and_strength_zero_is_the_identity():
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = _jitter_colors(x, 1.5, torch.Generator().manual_seed(2))
    assert y.min() >= -1 and y.max() <= 1 and not torch.equal(x, y)
    assert torch.equal(_jitter_colors(x, 0.0, torch.Generator().manual_seed(2)), x)


def test_the_command_line_default_is_the_trainer_default():
    from musetalk_fast.cli import build_parser
    from musetalk_fast.train.vae import VAETraining

    parser, parsers = build_parser()
    assert parser.parse_args(["train-vae", "--data", "D", "--out", "O"]).color_jitter is None  # the library's
    assert VAETraining.color_jitter == 0.4  # on by default (docs/model.md)
    assert f"default {VAETraining.color_jitter}," in " ".join(parsers["train-vae"].format_help().split())
    assert parser.parse_args(["train-vae", "--data", "D", "--out", "O", "--color-jitter", "0"]).color_jitter == 0.0


def test_the_library_refuses_a_strength_out_of_range_by_name():
    import numpy as np

    from musetalk_fast.model.config import ModelConfig
    from musetalk_fast.train.vae import VAETraining, train_vae

    frames = np.zeros((2, 128, 128, 3), np.uint8)
    with pytest.raises(ValueError, match=r"color_jitter must be in \[0, 2.0\] \(got -0.5\)"):
        train_vae(ModelConfig.named("tiny"), frames, training=VAETraining(steps=1, color_jitter=-0.5), progress=False)

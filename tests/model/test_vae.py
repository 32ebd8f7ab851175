"""The 16-channel VAE (tiny config): shapes, per-channel latent statistics measured on data, encode/decode
keeping [B, F] shapes, loading from a local folder or .safetensors with clear errors, and the lower-half mask."""
import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from musetalk_fast.data import synthetic_tensors
from musetalk_fast.model.config import ModelConfig
from musetalk_fast.model.vae import (LatentStats, build_vae, compute_latent_stats, decode, encode, load_vae,
                                     lower_half_mask, mask_lower_half, save_vae, to_model_images, to_uint8)


@pytest.fixture(scope="module")
def config():
    return ModelConfig.named("tiny")


@pytest.fixture(scope="module")
def vae(config):
    torch.manual_seed(0)
    return build_vae(config).eval()


@pytest.fixture(scope="module")
def frames(config):
    _, _, tensors = next(synthetic_tensors(1, 1, 0.2, seed=3))
    return to_model_images(tensors["video"], config.image_size)  # [5, 3, 128, 128]


def test_build_vae_has_16_channels_and_factor_8(config, vae, frames):
    assert vae.config.latent_channels == 16
    with torch.no_grad():
        mu = vae.encode(frames[:2]).latent_dist.mean
    assert mu.shape == (2, 16, config.latent_size, config.latent_size) == (2, 16, 16, 16)


def test_latent_stats_normalise_the_data_per_channel(vae, frames):
    stats = compute_latent_stats(vae, [frames[:3], frames[3:]])
    assert isinstance(stats, LatentStats) and set(dict(stats.named_buffers())) == {"shift", "scale"}
    with torch.no_grad():
        z = encode(vae, stats, frames).double()
    per_channel_mean = z.mean((0, 2, 3))
    per_channel_std = z.std((0, 2, 3), unbiased=False)
    torch.testing.assert_close(per_channel_mean, torch.zeros(16, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel_std, torch.ones(16, dtype=torch.float64), atol=1e-3, rtol=0)
    assert stats.scale.std() > 0  # measured per channel, not one constant


def test_uint8_batches_give_the_same_stats(vae, frames):
    uint8 = ((frames + 1) * 127.5).round().to(torch.uint8)
    a, b = compute_latent_stats(vae, [frames]), compute_latent_stats(vae, [uint8])
    torch.testing.assert_close(a.shift, b.shift, atol=2e-3, rtol=0)


def test_encode_decode_keep_batch_and_frame_dims(vae, frames):
    stats = compute_latent_stats(vae, [frames])
    clips = frames[:4].view(2, 2, 3, 128, 128)
    with torch.no_grad():
        z = encode(vae, stats, clips)
        flat = encode(vae, stats, frames[:4])
        images = decode(vae, stats, z, clamp=True)
    assert z.shape == (2, 2, 16, 16, 16)
    torch.testing.assert_close(z.flatten(0, 1), flat, atol=1e-5, rtol=1e-5)
    assert images.shape == clips.shape and images.abs().max() <= 1
    assert to_uint8(images).shape == (2, 2, 128, 128, 3)
    with pytest.raises(ValueError, match=r"images must be \[N, 3, H, W\] or \[B, F, 3, H, W\] \(got \(3, 128, 128\)\)"):
        encode(vae, stats, frames[0])
    with pytest.raises(ValueError, match=r"latents must be \[N, 16, h, w\]"):
        decode(vae, stats, torch.zeros(1, 4, 16, 16))


def test_folder_and_safetensors_round_trip(tmp_path, config, vae, frames):
    stats = compute_latent_stats(vae, [frames])
    save_vae(tmp_path / "vae", vae, stats)
    loaded, loaded_stats = load_vae(tmp_path / "vae", config)
    save_file(vae.state_dict(), str(tmp_path / "vae.safetensors"))
    from_file = build_vae(dataclasses.replace(config, vae=dataclasses.replace(
        config.vae, pretrained=str(tmp_path / "vae.safetensors"))))
    with torch.no_grad():
        want = encode(vae, stats, frames[:2])
        torch.testing.assert_close(encode(loaded.eval(), loaded_stats, frames[:2]), want)
        torch.testing.assert_close(encode(from_file.eval(), stats, frames[:2]), want)


def test_bad_pretrained_paths_are_named(tmp_path, config, vae):
    with pytest.raises(ValueError, match="vae.pretrained .*nowhere does not exist"):
        build_vae(config, pretrained=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder without config.json"):
        build_vae(config, pretrained=tmp_path / "empty")
    other = dataclasses.replace(config, vae=dataclasses.replace(config.vae, latent_channels=8))
    torch.manual_seed(0)
    small = build_vae(other)
    save_file(small.state_dict(), str(tmp_path / "eight.safetensors"))
    with pytest.raises(ValueError, match="does not fit config.vae: shapes differ"):
        build_vae(config, pretrained=tmp_path / "eight.safetensors")
    small.save_pretrained(tmp_path / "eight")
    with pytest.raises(ValueError, match="latent_channels is 8 there but 16 in the config"):
        build_vae(config, pretrained=tmp_path / "eight")
    with pytest.raises(ValueError, match="has no latent_stats.json"):
        load_vae(tmp_path / "eight", other)


def test_lower_half_mask_and_margin():
    mask = lower_half_mask(8)
    assert mask.shape == (1, 1, 8, 8)
    assert mask[0, 0, :4].sum() == 0 and mask[0, 0, 4:].min() == 1
    per_image = lower_half_mask(8, torch.tensor([0, 2]))
    assert per_image.shape == (2, 1, 8, 8)
    assert per_image[1, 0, :, 0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match=r"margin must be whole numbers of rows in \[0, 4\] \(got 5\)"):
        lower_half_mask(8, 5)
    images = torch.rand(2, 3, 3, 8, 8) * 2 - 1
    masked = mask_lower_half(images, torch.tensor([0, 2]))
    assert torch.equal(masked[0, :, :, :4], images[0, :, :, :4]) and masked[0, :, :, 4:].abs().max() == 0
    assert torch.equal(masked[1, :, :, :2], images[1, :, :, :2]) and masked[1, :, :, 2:].abs().max() == 0

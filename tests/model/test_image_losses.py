"""Image losses: SSIM / MS-SSIM against an independent float64 computation, the gradient loss, PSNR, the
LPIPS-style VGG loss from local weights (random weights here: no download), and clear errors."""
import numpy as np
import pytest
import torch

from musetalk_fast.train.image_losses import (MS_SSIM_WEIGHTS, ImageLoss, VGGPerceptual, gradient_loss, ms_ssim,
                                              psnr, ssim)
from tests.helpers import save_random_vgg16


def ssim_terms_numpy(x, y):
    """Mean luminance and contrast-structure terms of one grey image pair in [0, 1], by explicit windows."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    lum, cs = [], []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * a * a).sum() - ma ** 2, (w * b * b).sum() - mb ** 2
            cov = (w * a * b).sum() - ma * mb
            lum.append((2 * ma * mb + 1e-4) / (ma ** 2 + mb ** 2 + 1e-4))
            cs.append((2 * cov + 9e-4) / (va + vb + 9e-4))
    return np.mean(lum), np.mean(cs)


def test_ssim_and_ms_ssim_match_an_independent_computation():
    rng = np.random.default_rng(0)
    x = rng.random((32, 32))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    tx, ty = (torch.from_numpy(v)[None, None] * 2 - 1 for v in (x, y))
    lum, cs = ssim_terms_numpy(x, y)
    assert ssim(tx, ty).item() == pytest.approx(lum * cs, rel=1e-9)
    # 32 px: two scales (the coarsest, 16 px, still holds an 11 px window)
    half = lambda v: v.reshape(16, 2, 16, 2).mean((1, 3))  # noqa: E731
    lum1, cs1 = ssim_terms_numpy(half(x), half(y))
    w = np.array(MS_SSIM_WEIGHTS[:2]) / sum(MS_SSIM_WEIGHTS[:2])
    assert ms_ssim(tx, ty).item() == pytest.approx(cs ** w[0] * cs1 ** w[1] * lum1 ** w[1], rel=1e-9)
    assert ms_ssim(tx, tx).item() == pytest.approx(1.0)


def test_losses_order_and_shapes():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(x.flatten(0, 1), 3, 1, 1).view_as(x)
    noisy = (x + 0.05 * torch.randn_like(x)).clamp(-1, 1)
    assert ms_ssim(x, noisy).shape == (2, 3) and (ms_ssim(x, x) > 0.999).all()
    assert (ms_ssim(x, noisy) > ms_ssim(x, (x + 0.5 * torch.randn_like(x)).clamp(-1, 1))).all()
    assert gradient_loss(x, x + 0.3).item() == pytest.approx(0, abs=1e-6)  # a brightness shift has the same edges
    assert gradient_loss(x, blurred) > 0.1
    torch.testing.assert_close(psnr(x, x + 0.1), torch.full((2, 3), 10 * np.log10(400), dtype=torch.float64))
    pred = blurred.clone().requires_grad_()
    ImageLoss()(pred, x).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="two tensors of the same shape"):
        ms_ssim(x, x[0])
    with pytest.raises(ValueError, match="at least 11 px"):
        ms_ssim(x[..., :8, :8], x[..., :8, :8])


def test_vgg_perceptual_from_local_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_random_vgg16(tmp_path / "vgg16.safetensors")
    loss = VGGPerceptual(tmp_path / "vgg16.safetensors")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(x, x).abs().max() < 1e-6
    assert (loss(x, x.flip(-1)) > 0).all() and loss(x, x.flip(-1)).shape == (2,)
    assert not any(p.requires_grad for p in loss.parameters())
    with pytest.raises(ValueError, match="vgg_path .*missing.pth is not a file"):
        VGGPerceptual(tmp_path / "missing.pth")
    for name in ("corrupt.pth", "corrupt.safetensors"):
        (tmp_path / name).write_bytes(b"not a state dict")
        with pytest.raises(ValueError, match=f"vgg_path .*{name} could not be read as a state dict"):
            VGGPerceptual(tmp_path / name)
    assert ImageLoss(ssim_weight=0, gradient_weight=0)(x, x.flip(-1)).shape == ()  # a tensor, not 0.0
    save_file({"features.0.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="is not a torchvision vgg16 state dict"):
        VGGPerceptual(tmp_path / "bad.safetensors")
    torch.save({"lin0.model.1.weight": torch.ones(1, 3, 1, 1)}, tmp_path / "lpips.pth")
    with pytest.raises(ValueError, match=r"lpips_path .*expected lin0.model.1.weight of shape \(1, 64, 1, 1\)"):
        VGGPerceptual(tmp_path / "vgg16.safetensors", lpips_path=tmp_path / "lpips.pth")

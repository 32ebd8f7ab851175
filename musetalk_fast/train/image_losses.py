"""Image losses on decoded pixels (images in [-1, 1], [N, 3, H, W] or [B, F, 3, H, W]); nothing is downloaded.

- `ms_ssim(x, y)`: multi-scale SSIM (Wang, Simoncelli & Bovik 2003). At scale j (the image halved j times by
  2x2 average pooling) SSIM's contrast-structure term cs_j = mean((2 s_xy + C2) / (s_x^2 + s_y^2 + C2)), with
  local statistics under an 11x11 Gaussian window (sigma 1.5); at the coarsest scale also the luminance term
  l = mean((2 m_x m_y + C1) / (m_x^2 + m_y^2 + C1)). MS-SSIM = l_M^w_M * prod_j cs_j^w_j with the paper's
  weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), truncated and renormalised to the scales an image has
  (the coarsest at least 11 px). Pixels are mapped to [0, 1], so C1 = 0.01^2, C2 = 0.03^2. cs is clamped to
  >= 1e-4 before the power (a negative cs has no real power; the clamp keeps the gradient finite).
- `gradient_loss(x, y)`: L1 distance of the horizontal and vertical finite differences: it penalises blurred
  or misplaced edges (lip contours, teeth) that a plain L1 tolerates.
- `ImageLoss`: w_ssim (1 - MS-SSIM) + w_grad gradient loss [+ w_perceptual perceptual], the documented
  default perceptual loss of the trainer; `trainer_image_loss(vgg_path, lpips_path)` picks the trainer's.
- `VGGPerceptual(vgg_path, lpips_path=None)`: LPIPS (Zhang et al. 2018) on a VGG16 whose weights are read from
  a local file (torchvision's vgg16 state dict, .pth or .safetensors; only `features.*` is used); with
  `lpips_path` (the LPIPS project's vgg.pth: lin0..lin4) the learned channel weights, else each layer's
  channels weighted 1/C (the mean over a layer's channels; LPIPS' "baseline" sums them, which weighs the
  512-channel layers 8x the 64-channel one).
- `psnr(x, y)`: peak signal-to-noise ratio in dB for images in [-1, 1] (peak-to-peak 2), per image.
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WINDOW = 11


def _flat(images):
    return images.flatten(0, 1) if images.dim() == 5 else images


def _check_pair(x, y):
    if x.shape != y.shape or x.dim() not in (4, 5):
        raise ValueError(f"images must be two tensors of the same shape [N, C, H, W] or [B, F, C, H, W] "
                         f"(got {tuple(x.shape)} and {tuple(y.shape)})")


def _gaussian(channels, device, dtype, sigma=1.5):
    coords = torch.arange(WINDOW, device=device, dtype=dtype) - WINDOW // 2
    g = torch.exp(-coords.square() / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, WINDOW, WINDOW).contiguous()


def _ssim_terms(x, y, window):
    """(luminance, contrast-structure) per image, valid-window means, x and y in [0, 1]."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    groups = x.shape[1]
    blur = lambda t: F.conv2d(t, window, groups=groups)  # noqa: E731
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    luminance = ((2 * mx * my + c1) / (mx * mx + my * my + c1)).mean((1, 2, 3))
    cs = ((2 * sxy + c2) / (sxx + syy + c2)).mean((1, 2, 3))
    return luminance, cs


def ssim(x, y):
    """Single-scale SSIM per image (x, y in [-1, 1], at least 11 px), [N] (or [B, F])."""
    _check_pair(x, y)
    lead = x.shape[:-3]
    a, b = (_flat(x) + 1) / 2, (_flat(y) + 1) / 2
    luminance, cs = _ssim_terms(a, b, _gaussian(a.shape[1], a.device, a.dtype))
    return (luminance * cs).view(lead)


def ms_ssim(x, y):
    """Multi-scale SSIM per image (module docstring), [N] (or [B, F]); 1 for identical images."""
    _check_pair(x, y)
    if min(x.shape[-2:]) < WINDOW:
        raise ValueError(f"images must be at least {WINDOW} px on each side for SSIM (got {tuple(x.shape[-2:])})")
    lead = x.shape[:-3]
    a, b = (_flat(x) + 1) / 2, (_flat(y) + 1) / 2
    scales = min(len(MS_SSIM_WEIGHTS), int(math.log2(min(a.shape[-2:]) / WINDOW)) + 1)
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], device=a.device, dtype=a.dtype)
    weights = weights / weights.sum()
    window = _gaussian(a.shape[1], a.device, a.dtype)
    value = torch.ones(a.shape[0], device=a.device, dtype=a.dtype)
    for j in range(scales):
        luminance, cs = _ssim_terms(a, b, window)
        value = value * cs.clamp_min(1e-4) ** weights[j]
        if j + 1 < scales:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    value = value * luminance.clamp_min(1e-4) ** weights[-1]
    return value.view(lead)


def gradient_loss(x, y):
    """Mean L1 distance of the horizontal and vertical finite differences of x and y."""
    _check_pair(x, y)
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def psnr(x, y):
    """PSNR in dB per image of images in [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE); [N] (or [B, F])."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).square().mean((-3, -2, -1))
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


class ImageLoss(nn.Module):
    """w_ssim (1 - MS-SSIM) + w_grad gradient_loss [+ w_perceptual VGGPerceptual when perceptual is given];
    a scalar, the mean over images."""

    def __init__(self, ssim_weight=1.0, gradient_weight=1.0, perceptual=None, perceptual_weight=1.0):
        super().__init__()
        self.ssim_weight, self.gradient_weight, self.perceptual_weight = ssim_weight, gradient_weight, perceptual_weight
        self.perceptual = perceptual

    def forward(self, x, y):
        loss = x.new_zeros((), dtype=torch.float32)
        if self.ssim_weight:
            loss = loss + self.ssim_weight * (1 - ms_ssim(x, y)).mean()
        if self.gradient_weight:
            loss = loss + self.gradient_weight * gradient_loss(x, y)
        if self.perceptual is not None:
            loss = loss + self.perceptual_weight * self.perceptual(x, y).mean()
        return loss


def trainer_image_loss(vgg_path=None, lpips_path=None):
    """The trainer's image loss: LPIPS (VGGPerceptual) alone when local VGG16 weights are given, with the
    LPIPS project's learned channel weights when `lpips_path` is given too; otherwise the documented
    MS-SSIM + gradient loss (ImageLoss's default). Nothing is downloaded."""
    if vgg_path is None:
        if lpips_path is not None:
            raise ValueError("lpips_path needs vgg_path (the VGG16 its channel weights apply to)")
        return ImageLoss()
    return ImageLoss(ssim_weight=0.0, gradient_weight=0.0, perceptual=VGGPerceptual(vgg_path, lpips_path))


# torchvision's vgg16 "features": (out channels or "M" for max pooling); LPIPS reads relu1_2 .. relu5_3.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices of those ReLUs in `features`
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def _load_weights(path, what):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a file (local weights only; nothing is downloaded)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or foreign file: unpickling / safetensors header errors
        raise ValueError(f"{what} {path} could not be read as a state dict ({type(error).__name__}: "
                         f"{str(error)[:120]})") from error


class VGGPerceptual(nn.Module):
    """LPIPS distance per image on a frozen VGG16 from local weights (module docstring)."""

    def __init__(self, vgg_path, lpips_path=None):
        super().__init__()
        layers, channels, widths = [], 3, []
        for item in _VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=False)]
                channels = item
        self.features = nn.Sequential(*layers)
        widths = [self.features[i - 1].out_channels for i in _LPIPS_TAPS]
        state = {k[len("features."):]: v for k, v in _load_weights(vgg_path, "vgg_path").items()
                 if k.startswith("features.")}
        self._load(self.features, state, vgg_path, "vgg_path")
        self.lins = nn.ParameterList([nn.Parameter(torch.full((1, w, 1, 1), 1.0 / w), requires_grad=False)
                                      for w in widths])
        if lpips_path is not None:
            lins = _load_weights(lpips_path, "lpips_path")
            for k, lin in enumerate(self.lins):
                key = f"lin{k}.model.1.weight"
                if key not in lins or lins[key].shape != lin.shape:
                    raise ValueError(f"lpips_path {lpips_path}: expected {key} of shape {tuple(lin.shape)} "
                                     f"(the LPIPS project's vgg.pth)")
                lin.data.copy_(lins[key])
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _load(module, state, path, what):
        own = module.state_dict()
        if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
            raise ValueError(f"{what} {path} is not a torchvision vgg16 state dict (features.0.weight .. "
                             f"features.28.bias)")
        module.load_state_dict(state)

    def forward(self, x, y):
        _check_pair(x, y)
        lead = x.shape[:-3]
        h = (torch.cat([_flat(x), _flat(y)]) - self.shift) / self.scale
        distance = 0
        for index, layer in enumerate(self.features[:_LPIPS_TAPS[-1] + 1]):
            h = layer(h)
            if index in _LPIPS_TAPS:
                fx, fy = (h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10)).chunk(2)
                lin = self.lins[_LPIPS_TAPS.index(index)]
                distance = distance + ((fx - fy).square() * lin).sum(1).mean((1, 2))
        return distance.view(lead)

"""Training: the pixel-MeanFlow objective, frame sampling, checkpoints and the two-stage trainer (docs/train.md)."""
from .image_losses import ImageLoss, VGGPerceptual, gradient_loss, ms_ssim, psnr, ssim  # noqa: F401

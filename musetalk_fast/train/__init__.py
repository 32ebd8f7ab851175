"""Training and evaluation of the talking-head model: the pixel-MeanFlow objective, frame sampling,
checkpoints and the two-stage trainer (docs/train.md); image losses; the SyncNet and its lip-sync loss,
evaluation on held-out synthetic clips."""
from .evaluate import evaluate
from .image_losses import ImageLoss, VGGPerceptual, gradient_loss, ms_ssim, psnr, ssim  # noqa: F401
from .meanflow import pmf_loss, sample_times
from .syncnet import SyncNet, load_syncnet, sync_loss

"""Training: the pixel-MeanFlow objective, frame sampling, checkpoints and the two-stage trainer (docs/train.md)."""
from .meanflow import pmf_loss, sample_times

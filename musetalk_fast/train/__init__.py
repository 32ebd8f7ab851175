"""Training and evaluation of the talking-head model: the pixel-MeanFlow objective, frame sampling,
checkpoints and the two-stage trainer (docs/train.md); the SyncNet and its lip-sync loss, evaluation on
held-out synthetic clips."""
from .evaluate import evaluate
from .meanflow import pmf_loss, sample_times
from .syncnet import SyncNet, load_syncnet, sync_loss

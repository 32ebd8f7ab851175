"""Training and evaluation of the talking-head model: the SyncNet and its lip-sync loss, evaluation on
held-out synthetic clips."""
from .evaluate import evaluate
from .syncnet import SyncNet, load_syncnet, sync_loss

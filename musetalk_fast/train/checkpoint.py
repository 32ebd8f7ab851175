"""Training checkpoints: written atomically, read back for an exact resume.

A checkpoint is one torch.save'd dict: the model, optimizer, EMA and LR-schedule states, the step,
the data sampler's position (its own numpy generator's state), and the random states of python's
`random`, numpy's global generator and torch (CPU, and every CUDA device when there is one). After
`restore_rng_state` a resumed run draws the same numbers as the run that wrote the checkpoint, so
it reaches bit-identical weights (tests/train/test_trainer.py).

Atomic: the bytes go to a temporary file in the same folder, are flushed to disk, and os.replace
renames it over the target (atomic on POSIX within one file system), so a run killed mid-write
leaves the previous checkpoint whole, never a truncated one.
"""
import random
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_save

LATEST = "latest.pt"


def rng_state():
    """The random states of python, numpy's global generator and torch (CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, *, step, model, optimizer, ema=None, scheduler=None, sampler=None, extra=None):
    """Everything a resume needs, atomically written to `path`. `sampler` is any object with
    state_dict() (the data position); `extra` a dict of anything else (config, stage, curves)."""
    state = {"step": int(step), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "ema": ema.state_dict() if ema is not None else None,
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "sampler": sampler.state_dict() if sampler is not None else None,
             "rng": rng_state(), "extra": extra or {}}
    return atomic_save(state, path)


def load_checkpoint(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # weights_only=False: the RNG states are numpy arrays and tuples (a checkpoint we wrote ourselves)
    return torch.load(path, map_location=map_location, weights_only=False)


def resume(state, *, model, optimizer, ema=None, scheduler=None, sampler=None):
    """Load a checkpoint dict into the training objects and restore the random states; returns its step."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if sampler is not None and state.get("sampler") is not None:
        sampler.load_state_dict(state["sampler"])
    restore_rng_state(state["rng"])
    return int(state["step"])

"""Atomic checkpoints and exact restore of the random states (musetalk_fast/train/checkpoint.py)."""
import os
import random

import numpy as np
import pytest
import torch

from musetalk_fast.files import atomic_save
from musetalk_fast.train.checkpoint import load_checkpoint, resume, save_checkpoint
from musetalk_fast.train.ema import EMA


def test_atomic_save_leaves_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": Unpicklable()}, path)
    assert load_checkpoint(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left behind
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_resume_restores_model_optimizer_ema_and_every_random_state(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMA(model, decay=0.9)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    ema.update(model)
    save_checkpoint(tmp_path / "ck.pt", step=7, model=model, optimizer=optimizer, ema=ema, extra={"stage": 1})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = torch.nn.Linear(4, 3)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_ema = EMA(fresh, decay=0.9)
    state = load_checkpoint(tmp_path / "ck.pt")
    assert resume(state, model=fresh, optimizer=fresh_optimizer, ema=fresh_ema) == 7
    assert state["extra"] == {"stage": 1}
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, weights[name])
    assert fresh_ema.updates == 1 and all(torch.equal(fresh_ema.shadow[k], ema.shadow[k]) for k in ema.shadow)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]

"""The train-syncnet and eval commands on a small data folder: they run, and bad input is named."""
import json

import pytest
import torch

from musetalk_fast.cli import main
from musetalk_fast.data import write_dataset
from musetalk_fast.model.config import ModelConfig
from musetalk_fast.train.syncnet import load_syncnet


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 identities (train, val, test) x one clip of 0.6 s (15 frames)."""
    out = tmp_path_factory.mktemp("synthetic")
    write_dataset(out, 3, 1, 0.6, seed=5, force=True, progress=False)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny MuseTalk with random weights (its codebook fitted on random windows), saved."""
    from musetalk_fast.model.musetalk import MuseTalk

    torch.manual_seed(0)
    config = ModelConfig.named("tiny")
    model = MuseTalk(config)
    model.codebook.fit(torch.randn(200, config.audio.window_mels, config.audio.n_mels))
    path = tmp_path_factory.mktemp("model") / "model.pt"
    model.save(path)
    return path


def fails(argv, capsys, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_train_syncnet_writes_a_frozen_checkpoint_with_its_accuracy(data, tmp_path, capsys):
    out = tmp_path / "syncnet.pt"
    assert main(["train-syncnet", "--data", str(data), "--out", str(out), "--steps", "2", "--batch", "2",
                 "--no-progress"]) == 0
    assert "val offset accuracy" in capsys.readouterr().out
    net = load_syncnet(out)
    metrics = torch.load(out, weights_only=True)["metrics"]
    assert 0 <= metrics["offset_accuracy"] <= 1 and metrics["frames"] == 15 - 2 * net.sync.offsets
    assert metrics["train_clips"] == 1 and metrics["heldout_split"] == "val"
    fails(["train-syncnet", "--data", str(data), "--out", str(out)], capsys, "already exists; pass --force")


def test_train_syncnet_bad_input(data, tmp_path, capsys):
    out = str(tmp_path / "s.pt")
    fails(["train-syncnet", "--data", str(data), "--out", out, "--steps", "0"], capsys,
          "argument --steps: must be >= 1 (got 0)")
    fails(["train-syncnet", "--data", str(data), "--out", out, "--batch", "-1"], capsys, "argument --batch: must be >= 1")
    fails(["train-syncnet", "--data", str(tmp_path / "none"), "--out", out], capsys, "argument --data:")
    fails(["train-syncnet", "--data", str(data), "--out", str(tmp_path)], capsys, "argument --out:")
    fails(["train-syncnet", "--data", str(data), "--out", out, "--config", "huge"], capsys, "argument --config:")
    fails(["train-syncnet", "--data", str(data), "--out", out, "--threads", "0"], capsys, "argument --threads:")


def test_eval_prints_the_metrics(data, checkpoint, tmp_path, capsys):
    report = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--json", str(report),
                 "--threads", str(torch.get_num_threads())]) == 0
    metrics = json.loads(report.read_text())
    assert json.loads(capsys.readouterr().out) == metrics
    assert metrics["clips"] == 1 and metrics["frames"] == 15 and metrics["fps"] > 0
    assert -1 <= metrics["opening_correlation"] <= 1 and 0 <= metrics["mouth_ssim"] <= 1
    ceiling = metrics["vae_reconstruction"]  # the clips' own frames through the VAE
    assert set(ceiling) == {"opening_correlation", "opening_std_ratio", "silent_closed_share", "mouth_psnr",
                            "mouth_ssim"}
    assert -1 <= ceiling["opening_correlation"] <= 1 and 0 <= ceiling["mouth_ssim"] <= 1


def test_eval_bad_input(data, checkpoint, tmp_path, capsys):
    fails(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(data)], capsys,
          "argument --checkpoint:")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    fails(["eval", "--checkpoint", str(tmp_path / "other.pt"), "--data", str(data)], capsys,
          "is not a MuseTalk checkpoint")
    fails(["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "none")], capsys,
          "argument --data:")
    fails(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "dev"], capsys,
          "argument --split: invalid choice")

"""`musetalk-fast train-vae` and `musetalk-fast prepare` through the entry point (tiny config, two 0.2 s
synthetic clips): what the shards hold, that they match the library functions, and bad input refused with a
message naming the argument, nothing overwritten without --force."""
import json

import numpy as np
import pytest
import torch

from musetalk_fast.cli import main
from musetalk_fast.data import write_dataset
from musetalk_fast.data.real import read_audio
from musetalk_fast.model.audio import frame_windows, log_mel
from musetalk_fast.model.config import ModelConfig
from musetalk_fast.model.shards import load_clip, load_codebook, load_manifest
from musetalk_fast.model.vae import encode, load_vae, mask_lower_half, to_model_images


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    write_dataset(out, 2, 1, 0.2, seed=2, progress=False)
    return out


@pytest.fixture(scope="module")
def vae_folder(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vae"
    assert main(["train-vae", "--data", str(data), "--out", str(out), "--steps", "2", "--batch", "2",
                 "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def shards(data, vae_folder):
    out = vae_folder.parent / "shards"
    assert main(["prepare", "--data", str(data), "--vae", str(vae_folder), "--out", str(out), "--no-progress"]) == 0
    return out


def snapshot(folder):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_vae_writes_a_loadable_folder_and_a_report(vae_folder):
    report = json.loads((vae_folder / "train_vae.json").read_text())
    assert report["steps"] == 2 and len(report["history"]) == 2
    assert {"psnr_db", "mouth_psnr_db", "ms_ssim"} <= set(report["eval"])
    assert np.isfinite(report["eval"]["mouth_psnr_db"])
    vae, stats = load_vae(vae_folder, ModelConfig.named("tiny"))
    assert stats.shift.shape == (16,) and (stats.scale > 0).all()


def test_prepare_writes_what_the_library_computes(data, vae_folder, shards):
    config = ModelConfig.named("tiny")
    manifest = load_manifest(shards)
    assert [(c["identity"], c["clip"], c["num_frames"]) for c in manifest["clips"]] == \
        [("id0000", "clip000", 5), ("id0001", "clip000", 5)]
    arrays = load_clip(shards, manifest["clips"][0])
    assert arrays["latents"].shape == arrays["masked"].shape == (5, 16, 16, 16)
    assert arrays["windows"].shape == (5, 10, 80) and arrays["codes"].shape == (5,)
    assert arrays["codes"].dtype == np.int64 and arrays["frames"].shape == (5, 128, 128, 3)
    assert arrays["mouth"].shape == (5, 5) and arrays["mouth_box"].max() <= 128
    vae, stats = load_vae(vae_folder, config)
    images = to_model_images(arrays["frames"])
    with torch.no_grad():
        np.testing.assert_allclose(arrays["latents"], encode(vae, stats, images).numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(arrays["masked"], encode(vae, stats, mask_lower_half(images)).numpy(),
                                   atol=1e-4, rtol=1e-4)
    audio = read_audio(data / "id0000" / "clip000.wav")
    np.testing.assert_allclose(arrays["windows"], frame_windows(log_mel(audio, config.audio), 5, config.audio),
                               atol=1e-5)
    codebook = load_codebook(shards, config)
    assert np.array_equal(codebook.codes(torch.from_numpy(np.array(arrays["windows"]))[None])[0], arrays["codes"])


def test_nothing_overwritten_without_force(data, vae_folder, shards, capsys):
    before = snapshot(shards)
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--data", str(data), "--vae", str(vae_folder), "--out", str(shards), "--no-progress"])
    assert exit_.value.code == 2
    assert "argument --out: " in capsys.readouterr().err and snapshot(shards) == before
    (shards / "mine.txt").write_text("kept")
    assert main(["prepare", "--data", str(data), "--vae", str(vae_folder), "--out", str(shards), "--force",
                 "--no-progress"]) == 0
    assert (shards / "mine.txt").read_text() == "kept" and load_manifest(shards)["clips"]


@pytest.mark.parametrize("command, message", [
    (["prepare", "--vae", "{vae}", "--data", "{tmp}/none"], "argument --data: {tmp}/none is not a folder"),
    (["prepare", "--vae", "{tmp}/none", "--data", "{data}"], "argument --vae: {tmp}/none does not exist"),
    (["prepare", "--vae", "{data}", "--data", "{data}"], "argument --vae: {data} is a folder without config.json"),
    (["prepare", "--vae", "{vae}", "--data", "{tmp}"], "argument --data: {tmp} holds no clips"),
    (["train-vae", "--data", "{tmp}/none"], "argument --data: {tmp}/none is not a folder"),
    (["train-vae", "--data", "{data}", "--crop", "12"], "argument --crop: must be a multiple of 8 in [8, 128] (got 12)"),
    (["train-vae", "--data", "{data}", "--steps", "0"], "argument --steps: must be >= 1 (got 0)"),
    (["train-vae", "--data", "{data}", "--color-jitter", "-0.1"], "argument --color-jitter: must be in [0, 2.0] (got -0.1)"),
])
def test_bad_input_is_named(tmp_path, data, vae_folder, capsys, command, message):
    values = {"tmp": tmp_path, "data": data, "vae": vae_folder}
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main([part.format(**values) for part in command] + ["--out", str(out), "--no-progress"])
    assert exit_.value.code == 2
    assert message.format(**values) in capsys.readouterr().err
    assert not out.exists()

"""The trainer end to end on the tiny U-Net: both stages train a few steps and checkpoint; a run killed
right after a checkpoint (an exception injected there) resumes to bit-identical weights, optimizer, EMA
and data position at the next step, in each stage. 64-pixel frames and a narrow VAE keep it fast on a CPU
(the tiny config's U-Net, audio encoder and Engram are as they are)."""
import json

import numpy as np
import pytest
import torch

from musetalk_fast.cli import main
from musetalk_fast.data import write_dataset
from musetalk_fast.model.config import ModelConfig, VAEConfig
from musetalk_fast.model.vae import LatentStats, build_vae, save_vae
from musetalk_fast.train.checkpoint import load_checkpoint
from musetalk_fast.train.pipeline import TrainArgumentError, run_train
from musetalk_fast.train.syncnet import SyncNet, syncnet_state
from musetalk_fast.train.trainer import TrainOptions


class Killed(Exception):
    pass


def kill_after(at):
    def callback(step):
        if step == at:
            raise Killed(f"killed after step {step}")
    return callback


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # One intra-op thread: on a shared 2-core machine two OpenMP threads per process spin against the other
    # processes' and run the tiny U-Net ~40x slower (measured: 1.3 s vs 0.03 s per forward).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trainer")
    write_dataset(root / "data", identities=3, clips_per_identity=1, seconds=1.0, seed=3, progress=False)
    config = ModelConfig.named("tiny")
    config.image_size, config.clip_frames = 64, 2
    config.vae = VAEConfig(block_channels=(8, 16, 16, 16), layers_per_block=1, norm_groups=8)
    torch.manual_seed(0)
    save_vae(root / "vae", build_vae(config), LatentStats(config.vae.latent_channels))
    torch.save(syncnet_state(SyncNet(config)), root / "syncnet.pt")
    yield root, config
    torch.set_num_threads(threads)


def _options(**changes):
    base = dict(batch=2, checkpoint_every=1, eval_clips=0, warmup=2, margins=(0, 8))
    base.update(changes)
    return TrainOptions(**base)


def _run(setup, out, stages, **kwargs):
    root, config = setup
    return run_train(root / "data", out, config, stages=stages, steps=2, vae=root / "vae",
                     syncnet=root / "syncnet.pt", progress=False, **kwargs)


def _assert_identical(a, b):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_identical(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_identical(x, y)
    else:
        assert a == b


def test_both_stages_train_checkpoint_and_resume_bit_identically(setup, tmp_path):
    root, config = setup
    # On the CPU whatever the machine (run_train's default device is the GPU when there is one): bit-identical
    # steps need deterministic kernels, which a GPU run does not ask for (the attention backwards' fp32 atomics,
    # cuDNN's weight-gradient algorithms may sum in a run-dependent order); the resume logic is the same anywhere.
    device = "cpu"
    # the uninterrupted run: stage 1 then stage 2, two steps each, evaluated on one held-out clip
    history = _run(setup, tmp_path / "a", (1, 2), options=_options(eval_clips=1), device=device)
    assert [(row["stage"], row["step"]) for row in history.steps] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(torch.isfinite(torch.tensor(row["loss_total"])) for row in history.steps)
    assert all({"loss_pmf", "loss_mouth"} <= set(row) for row in history.steps)
    assert all("loss_sync" in row for row in history.steps if row["stage"] == 2 and row["sync_weight"] > 0)
    assert {row["stage"] for row in history.evals} == {1, 2}
    assert 0 <= history.evals[-1]["silent_closed_share"] <= 1
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert len(report["steps"]) == 4 and "stage1_label_cleaning" in report["info"]
    assert (tmp_path / "a" / "report.png").stat().st_size > 0
    assert (tmp_path / "a" / "stage2" / "model.pt").is_file()
    frozen_in_stage1 = load_checkpoint(tmp_path / "a" / "stage1" / "checkpoint.pt")["model"]
    gate = [k for k in frozen_in_stage1 if k.startswith("unet.engram_join")]
    assert gate and all(torch.equal(frozen_in_stage1[k], torch.load(tmp_path / "a" / "stage1" / "model.pt",
                                                                       weights_only=True)["state_dict"][k])
                        for k in gate)

    # killed after step 1 of each stage, resumed: step 2 is bit-identical to the uninterrupted run's
    for stage in (1, 2):
        with pytest.raises(Killed):
            _run(setup, tmp_path / "b", (stage,), options=_options(), callback=kill_after(1), device=device)
        assert load_checkpoint(tmp_path / "b" / f"stage{stage}" / "checkpoint.pt")["step"] == 1
        _run(setup, tmp_path / "b", (stage,), options=_options(), resume=True, device=device)
        resumed = load_checkpoint(tmp_path / "b" / f"stage{stage}" / "checkpoint.pt")
        straight = load_checkpoint(tmp_path / "a" / f"stage{stage}" / "checkpoint.pt")
        assert resumed["step"] == straight["step"] == 2
        for part in ("model", "optimizer", "ema", "scheduler", "sampler", "rng"):
            _assert_identical(resumed[part], straight[part])
    # the stage-2 command's report keeps the stage-1 command's curves and timings
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert {1, 2} == {row["stage"] for row in report["steps"]} and "stage1_train_seconds" in report["info"]


def test_bad_input_is_named(setup, tmp_path, capsys):
    root, config = setup
    with pytest.raises(TrainArgumentError, match="^data .* is not a folder"):
        run_train(tmp_path / "missing", tmp_path / "run", config, progress=False)
    with pytest.raises(TrainArgumentError, match="^init .*stage1/model.pt is not a file"):
        run_train(root / "data", tmp_path / "run", config, stages=(2,), progress=False, syncnet=root / "syncnet.pt")
    with pytest.raises(TrainArgumentError, match="^vae .* does not exist"):
        run_train(root / "data", tmp_path / "run", config, stages=(1,), vae=tmp_path / "novae", progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(root / "data"), "--out", str(tmp_path / "run"), "--steps", "0"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(root / "data"), "--out", str(tmp_path / "run"), "--seed", "-1"])
    assert exit_info.value.code == 2 and "argument --seed: must be >= 0 (got -1)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(root / "data"), "--out", str(tmp_path / "run"), "--seed", "5000000"])
    assert exit_info.value.code == 2 and "argument --seed: must be <= 4294965" in capsys.readouterr().err
    with pytest.raises(ValueError, match="one_step_target must be 'x' or 'pmf'"):
        _options(one_step_target="mean")


def test_a_non_finite_loss_stops_naming_the_step_and_the_loss(setup, tmp_path, monkeypatch):
    from musetalk_fast.train import trainer

    real = trainer.pmf_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(trainer, "pmf_loss", poisoned)
    with pytest.raises(trainer.NonFiniteLossError, match=r"^step 1: loss 'pmf' is nan"):
        _run(setup, tmp_path / "nan", (1,), options=_options())
    assert not (tmp_path / "nan" / "stage1" / "checkpoint.pt").exists()


def test_the_seed_sets_the_init_after_a_vae_trained_in_the_run(setup, tmp_path, monkeypatch):
    """VAE training seeds itself; the U-Net's init must follow options.seed whether or not a VAE was trained."""
    from musetalk_fast.train import pipeline

    root, config = setup
    real_build, seeds = pipeline.build_stage1_model, []

    def provide(*args, **kwargs):
        torch.manual_seed(0)  # what train_vae does
        torch.rand(5)
        return root / "vae"

    def build(*args, **kwargs):
        seeds.append((torch.initial_seed(), torch.get_rng_state()))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(pipeline, "provide_vae", provide)
    monkeypatch.setattr(pipeline, "build_stage1_model", build)
    for seed in (3, 3, 4):
        run_train(root / "data", tmp_path / f"s{seed}-{len(seeds)}", config, stages=(1,), steps=1, progress=False,
                  options=_options(seed=seed))
    assert [s for s, _ in seeds] == [3, 3, 4]
    assert torch.equal(seeds[0][1], torch.manual_seed(3).get_state())  # a fresh generator: nothing drawn since
    assert not torch.equal(seeds[0][1], seeds[2][1])
    with pytest.raises(ValueError, match=r"seed must be in \[0, 4294965\]"):
        _options(seed=-1)


@pytest.mark.parametrize("target", ["x", "pmf"])
def test_one_step_rows_get_the_boundary_target_x_by_default(setup, tmp_path, monkeypatch, target):
    """The trainer marks its (t, r) = (1, 0) rows as pmf_loss's boundary rows ("x"), or none ("pmf")."""
    from musetalk_fast.train import trainer

    real, calls = trainer.pmf_loss, []

    def spy(predict_x, x, eps, t, r, **kwargs):
        calls.append((t.clone(), r.clone(), kwargs.get("boundary_rows")))
        return real(predict_x, x, eps, t, r, **kwargs)

    monkeypatch.setattr(trainer, "pmf_loss", spy)
    _run(setup, tmp_path / target, (1,), options=_options(one_step_share=0.5, one_step_target=target))
    assert len(calls) == 2
    for t, r, boundary in calls:
        if target == "pmf":
            assert boundary is None
        else:
            assert torch.equal(boundary, (t == 1) & (r == 0))
    assert any(bool(((t == 1) & (r == 0)).any()) for t, r, _ in calls)  # the seed draws one-step rows


def test_reference_pose_pool_reaches_the_reference_candidates(setup, tmp_path, monkeypatch):
    """TrainOptions.reference_pose_pool is the pose pool of every training clip's reference candidates."""
    from musetalk_fast.train import data as train_data
    from musetalk_fast.train.pipeline import build_stage1_model, read_data
    from musetalk_fast.train.sampling import pose_features, reference_candidates

    root, config = setup
    train, _ = read_data(root / "data", config, 0)
    model = build_stage1_model(config, root / "vae", train, "cpu")
    for pool in (2, 1000):
        clips, _ = train_data.encode_clips(model, train, pose_pool=pool)
        for clip, folder_clip in zip(clips, train):
            truth = folder_clip.truth
            expected = reference_candidates(pose_features(truth), truth["mouth"][:, 0], pose_pool=pool)
            assert np.array_equal(clip.candidates, expected)
    seen = []

    def record(*args, pose_pool, **kwargs):
        seen.append(pose_pool)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_data, "encode_clips", record)
    with pytest.raises(KeyboardInterrupt):
        run_train(root / "data", tmp_path / "run", config, stages=(1,), steps=1, vae=root / "vae",
                  options=TrainOptions(reference_pose_pool=5), progress=False)
    assert seen == [5]
    with pytest.raises(ValueError, match="reference_pose_pool"):
        TrainOptions(reference_pose_pool=0)


def test_stage2_adds_margins_to_the_latents_of_stage1(setup):
    """Stage 2 of a two-stage run encodes only the margins stage 1 did not: the same latents as encoding all."""
    from musetalk_fast.train.data import add_margins, encode_clips
    from musetalk_fast.train.pipeline import build_stage1_model, read_data

    root, config = setup
    train, _ = read_data(root / "data", config, 0)
    model = build_stage1_model(config, root / "vae", train, "cpu")
    stage1, counts = encode_clips(model, train, margins=(0,))
    added = add_margins(model, stage1, (0, 8, 16))
    direct, direct_counts = encode_clips(model, train, margins=(0, 8, 16))
    assert counts == direct_counts and len(added) == len(direct)
    for a, b, first in zip(added, direct, stage1):
        assert sorted(a.masked) == [0, 8, 16] and a.masked[0] is first.masked[0] and a.latents is first.latents
        for margin in (0, 8, 16):
            assert torch.equal(a.masked[margin], b.masked[margin])

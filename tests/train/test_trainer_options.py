"""The trainer's optional parts: MuseTalk 1.5's one-step L1 objective (the comparison row), LPIPS on local
VGG16 weights from the command line, and Transformer Engine fp8 linears (a stand-in module here: the
package is not installed on CPU machines; the swap, the freezing, the EMA copy and the no-TE fallback are
what is tested)."""
import contextlib
import warnings

import pytest
import torch

from musetalk_fast.cli import main
from musetalk_fast.train import image_losses, precision, trainer
from musetalk_fast.train.checkpoint import load_checkpoint
from musetalk_fast.train.trainer import one_step_l1
from tests.helpers import save_random_vgg16

from .test_trainer import _options, _run, setup  # noqa: F401 (setup is the module's fixture)


def test_one_step_l1_is_the_l1_of_the_one_step_prediction():
    x, eps = torch.randn(3, 2, 4, 5, 5), torch.randn(3, 2, 4, 5, 5)
    seen = []

    def predict_x(z, t, r, rows=None):
        seen.append((z, t, r))
        return 0.5 * z + t.view(-1, 1, 1, 1, 1)

    out = one_step_l1(predict_x, x, eps)
    (z, t, r), = seen
    assert z is eps and torch.equal(t, torch.ones(3)) and torch.equal(r, torch.zeros(3))
    expected = 0.5 * eps + 1 - x
    torch.testing.assert_close(out["loss"], expected.abs().mean())
    torch.testing.assert_close(out["mse"], expected.square().flatten(1).mean(1))


def test_the_l1_objective_trains_only_the_one_step_without_pmf(setup, tmp_path, monkeypatch):
    calls = []
    real = trainer.one_step_l1

    def no_pmf(*args, **kwargs):
        raise AssertionError("the l1 objective must not take the pMF loss")

    def spy(predict_x, x, eps):
        calls.append(x.shape[0])
        return real(predict_x, x, eps)

    monkeypatch.setattr(trainer, "pmf_loss", no_pmf)
    monkeypatch.setattr(trainer, "one_step_l1", spy)
    history = _run(setup, tmp_path / "l1", (1, 2), options=_options(objective="l1"))
    assert calls == [2, 2, 2, 2]  # both stages, two steps of two clips
    assert all("loss_latent_l1" in row and "loss_pmf" not in row for row in history.steps)
    assert all({"loss_l1", "loss_mouth"} <= set(row) for row in history.steps)
    t, r = trainer.flow_times(5, _options(objective="l1"))
    assert torch.equal(t, torch.ones(5)) and torch.equal(r, torch.zeros(5))
    with pytest.raises(ValueError, match="objective must be 'pmf' or 'l1'"):
        _options(objective="gan")


def test_perceptual_vgg_and_the_objective_from_the_command_line(setup, tmp_path, monkeypatch, capsys):
    root, config = setup
    monkeypatch.setattr("musetalk_fast.model.config.ModelConfig.named", classmethod(lambda cls, name: config))
    torch.manual_seed(0)
    save_random_vgg16(tmp_path / "vgg16.safetensors")
    perceptual_calls, ssim_calls = [], []
    real_forward = image_losses.VGGPerceptual.forward
    monkeypatch.setattr(image_losses.VGGPerceptual, "forward",
                        lambda self, x, y: perceptual_calls.append(x.shape) or real_forward(self, x, y))
    monkeypatch.setattr(image_losses, "ms_ssim", lambda x, y: ssim_calls.append(x.shape) or torch.zeros(()))
    threads = torch.get_num_threads()
    main(["train", "--data", str(root / "data"), "--out", str(tmp_path / "run"), "--stage", "1", "--steps", "1",
          "--batch", "2", "--vae", str(root / "vae"), "--perceptual-vgg", str(tmp_path / "vgg16.safetensors"),
          "--objective", "l1", "--no-progress", "--threads", str(threads)])  # MuseTalk 1.5's L1 + LPIPS
    report = load_checkpoint(tmp_path / "run" / "stage1" / "checkpoint.pt")["extra"]
    assert report["options"]["perceptual_vgg"] == str(tmp_path / "vgg16.safetensors")
    assert report["options"]["objective"] == "l1"
    assert perceptual_calls and not ssim_calls
    assert all("loss_image" in row for row in report["history"]["steps"])

    for extra, message in ((["--perceptual-vgg", str(tmp_path / "missing.pth")],
                            r"argument --perceptual-vgg: .*missing.pth is not a file"),
                           (["--perceptual-lpips", str(tmp_path / "vgg16.safetensors")],
                            "argument --perceptual-lpips: needs --perceptual-vgg")):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--data", str(root / "data"), "--out", str(tmp_path / "bad"), "--vae", str(root / "vae"),
                  "--no-progress", *extra])
        assert exit_info.value.code == 2
        assert __import__("re").search(message, capsys.readouterr().err)


class _FakeTE:
    """Transformer Engine as the trainer sees it: te.Linear (an nn.Linear subclass with an fp8 extra state
    that, like TE, refuses fp8 inputs whose rows are not a multiple of 8) and a nestable te.fp8_autocast.
    Every call is recorded as (rows, fp8 on, autograd on)."""

    def __init__(self):
        self.stack, self.calls, self.entered = [], [], []
        te = self

        class Linear(torch.nn.Linear):
            def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
                super().__init__(in_features, out_features, bias=bias, dtype=params_dtype, device=device)

            def forward(self, x):
                rows, fp8 = x.numel() // x.shape[-1], bool(te.stack and te.stack[-1])
                te.calls.append((rows, fp8, torch.is_grad_enabled()))
                assert not fp8 or rows % 8 == 0, f"fp8 input rows {rows} not a multiple of 8 (TE asserts)"
                return super().forward(x)

            def get_extra_state(self):
                return torch.tensor([1.0, 2.0])  # te's fp8 scaling metadata

            def set_extra_state(self, state):
                pass

        self.Linear = Linear

    @contextlib.contextmanager
    def fp8_autocast(self, enabled=True):
        self.entered.append(enabled)
        self.stack.append(enabled)
        try:
            yield
        finally:
            self.stack.pop()


def test_fp8_linears_keep_stage1_freezing_and_the_ema_copy(setup, tmp_path, monkeypatch):
    te = _FakeTE()
    monkeypatch.setattr(precision, "transformer_engine", lambda device: te)
    # every row but the one-step ones takes the JVP: its finite-difference forwards must run without fp8
    history = _run(setup, tmp_path / "fp8", (1, 2), options=_options(fp8=True, eval_clips=1, equal_share=0.0))
    assert history.info["stage1_fp8_linears"] == history.info["stage2_fp8_linears"] > 0
    assert te.entered and True in te.entered
    assert any(fp8 for _, fp8, _ in te.calls)  # the swapped linears ran, in fp8
    assert any(not grad for _, _, grad in te.calls)  # the JVP's forwards ran ...
    assert not any(fp8 and not grad for _, fp8, grad in te.calls)  # ... none of them in fp8
    # the time embedding's B-row inputs ran without fp8 (TE would refuse them)
    assert any(rows % 8 and not fp8 for rows, fp8, _ in te.calls)
    # no torch.utils.checkpoint recompute outside the fp8 context
    assert history.info["stage1_grad_checkpointing"] is False and history.info["stage2_grad_checkpointing"] is False
    stage1 = load_checkpoint(tmp_path / "fp8" / "stage1" / "checkpoint.pt")
    assert any(k.endswith("_extra_state") for k in stage1["model"])
    assert not any(k.endswith("_extra_state") for k in stage1["ema"]["shadow"])
    # the Engram (frozen in stage 1) was swapped too and kept its initial weights through stage 1
    engram = [k for k in stage1["model"] if k.startswith("unet.engram_join") and not k.endswith("_extra_state")]
    shipped = torch.load(tmp_path / "fp8" / "stage1" / "model.pt", weights_only=True)["state_dict"]
    assert any("value_proj" in k for k in engram)
    for key in engram:
        assert torch.equal(stage1["model"][key], shipped[key]), key
    stage2 = load_checkpoint(tmp_path / "fp8" / "stage2" / "checkpoint.pt")["model"]
    assert any(not torch.equal(stage2[k], stage1["model"][k]) for k in engram)  # unfrozen in stage 2

    # resuming with other options than the checkpoint's is refused, naming them
    from musetalk_fast.train.pipeline import TrainArgumentError

    with pytest.raises(TrainArgumentError, match=r"^resume .*fp8 True -> False"):
        _run(setup, tmp_path / "fp8", (2,), options=_options(eval_clips=1, equal_share=0.0), resume=True)


def test_fp8_without_transformer_engine_warns_and_trains_without(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "transformer_engine", lambda device: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = _run(setup, tmp_path / "nofp8", (1,), options=_options(fp8=True))
    assert history.info["stage1_fp8_linears"] == 0 and len(history.steps) == 2
    assert any("transformer-engine" in str(w.message) for w in caught)


def test_periodic_evaluation_and_the_sync_weight_ramp(setup, tmp_path):
    """eval_every evaluates the EMA weights every N steps of each stage; stage 2's sync weight rises
    linearly from 0 to sync_weight over the first sync_ramp of its steps, then stays."""
    root, config = setup
    history = _run(setup, tmp_path / "ramp", (1, 2), options=_options(eval_every=1, eval_clips=1))
    assert [(row["stage"], row["step"]) for row in history.evals] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(0 <= row["silent_closed_share"] <= 1 for row in history.evals)
    ramp = [row["sync_weight"] for row in history.steps]
    assert ramp == [0.0, 0.0, 0.0, pytest.approx(0.1)]  # stage 1: none; stage 2 of 2 steps, ramp over 1 step
    assert "loss_sync" not in history.steps[2] and "loss_sync" in history.steps[3]

"""MuseTalkUNet (tiny config): shapes, our ops against the reference ops with the same weights (forward and
backward), any F, gradient checkpointing, and named errors for bad input."""
import pytest
import torch

import musetalk_fast.ops as ops
from musetalk_fast import reference
from musetalk_fast.model.config import ModelConfig
from musetalk_fast.model.unet import MuseTalkUNet

CONFIG = ModelConfig.named("tiny")
# The op families the U-Net runs (sinkhorn runs inside mhc_pre's kernel; the indexer only when F > topk).
MODEL_OPS = ["gated_attention", "sparse_attention", "mhc_pre", "mhc_post", "engram_lookup"]


def make_unet(seed=0):
    """A tiny U-Net with every parameter random: its zero-initialised branches would hide errors."""
    torch.manual_seed(seed)
    unet = MuseTalkUNet(CONFIG)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0, 0.2 if parameter.dim() > 1 else 0.05)
        for block in unet.modules():  # mHC coefficients off their identity start, still near it
            if hasattr(block, "alpha") and hasattr(block, "bias"):
                block.alpha.fill_(0.1)
    return unet


def make_inputs(batch, frames, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    size, audio = CONFIG.latent_size, CONFIG.audio
    latent = [torch.randn(batch, frames, CONFIG.vae.latent_channels, size, size, generator=gen, dtype=dtype)
              for _ in range(3)]
    t = torch.rand(batch, generator=gen, dtype=dtype)
    return dict(z_t=latent[0], masked=latent[1], reference=latent[2],
                audio=torch.randn(batch, frames, audio.window_mels, audio.dim, generator=gen, dtype=dtype),
                codes=torch.randint(0, audio.codes, (batch, frames), generator=gen), t=t, r=t * torch.rand(batch, generator=gen))


def test_shapes_zero_start_and_engram_parameters():
    unet = MuseTalkUNet(CONFIG)
    inputs = make_inputs(2, 3)
    out = unet(**inputs)
    assert out.shape == inputs["z_t"].shape and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output conv
    engram = unet.engram_parameters()
    assert engram and all(any(p is q for q in unet.parameters()) for p in engram)
    assert any(p is unet.engram_join.engram.table for p in engram) and any(p is unet.engram_join.gate for p in engram)


def forward_backward(unet, inputs, weight):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v.is_floating_point() and k != "t" and k != "r"}
    out = unet(**{**inputs, **leaves})
    loss = (out * weight).sum()
    indexer = unet.indexer_loss()
    if indexer is not None:
        loss = loss + indexer
    names = [n for n, _ in unet.named_parameters()] + list(leaves)
    grads = torch.autograd.grad(loss, [*unet.parameters(), *leaves.values()], allow_unused=True)
    return out, dict(zip(names, grads))


def count_reference_calls(monkeypatch):
    calls = {name: 0 for name in MODEL_OPS}
    for name in MODEL_OPS:
        original = getattr(reference, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(reference, name, counted)
    return calls


@pytest.mark.parametrize("batch,frames", [(1, 1), (2, 3)])
def test_our_ops_match_reference_ops_forward_and_backward(batch, frames, monkeypatch):
    """The same weights on the kernels and on musetalk_fast/reference.py: outputs and every gradient
    (parameters, latents, audio; the indexer's KL loss included) agree to float32 tolerance."""
    unet = make_unet()
    inputs = make_inputs(batch, frames)
    weight = torch.randn(inputs["z_t"].shape, generator=torch.Generator().manual_seed(2))
    calls = count_reference_calls(monkeypatch)
    out, grads = forward_backward(unet, inputs, weight)
    assert not any(calls.values())
    with ops.use_reference_ops():
        ref_out, ref_grads = forward_backward(unet, inputs, weight)
    assert all(calls.values()), calls  # every op family of the model ran on the reference
    assert out.abs().max() > 0.1  # random weights: a real output, not the zero start
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    for name, ref_grad in ref_grads.items():
        if ref_grad is None:
            assert grads[name] is None, name
            continue
        scale = ref_grad.abs().max().item()
        torch.testing.assert_close(grads[name], ref_grad, atol=1e-4 * max(scale, 1.0), rtol=1e-3,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def test_sparse_temporal_attention_when_frames_exceed_topk(monkeypatch):
    """F > temporal_topk: each frame reads its top-k frames chosen by the lightning indexer (eval mode)."""
    unet = make_unet().eval()
    frames = CONFIG.unet.temporal_topk + 1
    inputs = make_inputs(1, frames)
    calls = {"lightning_indexer_topk": 0}
    original = reference.lightning_indexer_topk
    monkeypatch.setattr(reference, "lightning_indexer_topk",
                        lambda *a, **k: calls.__setitem__("lightning_indexer_topk", 1) or original(*a, **k))
    with torch.no_grad():
        out = unet(**inputs)
        with ops.use_reference_ops():
            ref_out = unet(**inputs)
    assert calls["lightning_indexer_topk"] == 1
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    unet = make_unet()
    inputs = make_inputs(1, 2)
    weight = torch.randn(inputs["z_t"].shape, generator=torch.Generator().manual_seed(3))
    out, grads = forward_backward(unet, inputs, weight)
    unet.gradient_checkpointing = True
    out_ckpt, grads_ckpt = forward_backward(unet, inputs, weight)
    torch.testing.assert_close(out_ckpt, out)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_indexer_loss_only_in_training():
    unet = MuseTalkUNet(CONFIG)
    inputs = make_inputs(1, 2)
    unet(**inputs)
    assert unet.indexer_loss() is not None and unet.indexer_loss().requires_grad
    unet.eval()
    with torch.no_grad():
        unet(**inputs)
    assert unet.indexer_loss() is None


def bad(names, make):
    def change(inputs):
        inputs = dict(inputs)
        for name in names.split():
            inputs[name] = make(inputs[name])
        return inputs
    return change


BAD_INPUTS = [
    (bad("z_t", lambda x: x[:, :, :8]), ValueError, r"z_t must have shape \[B, F, C, h, w\] = \[B, F, 16, h, w\]"),
    (bad("z_t", lambda x: x[0]), ValueError, "z_t must have shape"),
    (bad("z_t masked reference", lambda x: x[..., :7, :7]), ValueError, "z_t's h and w must be multiples of 2"),
    (bad("z_t", lambda x: x.long()), TypeError, "z_t must be"),
    (bad("masked", lambda x: x[:, :1]), ValueError, r"masked must have shape \[B, F, C, h, w\] = \[2, 3, 16, 16, 16\]"),
    (bad("reference", lambda x: x[..., :8, :8]), ValueError, "reference must have shape"),
    (bad("audio", lambda x: x[:, :, :5]), ValueError, r"audio must have shape \[B, F, W, D\] = \[2, 3, 10, 64\]"),
    (bad("codes", lambda x: x.int()), TypeError, "codes must be int64, got int32"),
    (bad("codes", lambda x: x[:, :2]), ValueError, r"codes must have shape \[B, F\] = \[2, 3\]"),
    (bad("codes", lambda x: x + CONFIG.audio.codes), ValueError, r"codes must be in \[0, 64\)"),
    (bad("t", lambda x: x[:1]), ValueError, r"t must have shape \[B\] = \[2\]"),
    (bad("r", lambda x: x + 2), ValueError, "0 <= r <= t <= 1"),
]


@pytest.mark.parametrize("change,error,message", BAD_INPUTS)
def test_bad_input_gets_a_named_error(change, error, message):
    unet = MuseTalkUNet(CONFIG)
    with pytest.raises(error, match=message):
        unet(**change(make_inputs(2, 3)))


def test_bad_config_gets_a_named_error():
    config = ModelConfig.named("tiny")
    config.unet.head_dim = 16
    with pytest.raises(ValueError, match="unet.head_dim must be one of"):
        MuseTalkUNet(config)

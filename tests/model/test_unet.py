"""MuseTalkUNet (tiny config): shapes, our ops against the reference ops with the same weights (forward and
backward), any F, gradient checkpointing, and named errors for bad input."""
import copy

import pytest
import torch

import musetalk_fast.ops as ops
from musetalk_fast import reference
from musetalk_fast.model import blocks
from musetalk_fast.model.config import ModelConfig
from musetalk_fast.model.unet import MuseTalkUNet
from tests.helpers import DEVICES

CONFIG = ModelConfig.named("tiny")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These shapes are too small to gain from threads, and on a shared, oversubscribed CPU the thread
    pool's waits cost up to 30x (measured: a tiny train step 0.12 s on 1 thread, 1.9-2.8 s on 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
# The op families the U-Net runs (sinkhorn runs inside mhc_pre's kernel; the indexer only when F > topk).
MODEL_OPS = ["gated_attention", "sparse_attention", "mhc_pre", "mhc_post", "engram_lookup"]


def make_unet(seed=0, device="cpu"):
    """A tiny U-Net with every parameter random: its zero-initialised branches would hide errors."""
    torch.manual_seed(seed)
    unet = MuseTalkUNet(CONFIG).to(device)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0, 0.2 if parameter.dim() > 1 else 0.05)
        for block in unet.modules():  # mHC coefficients off their identity start, still near it
            if hasattr(block, "alpha") and hasattr(block, "bias"):
                block.alpha.fill_(0.1)
    return unet


def make_inputs(batch, frames, seed=1, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    size, audio = CONFIG.latent_size, CONFIG.audio
    latent = [torch.randn(batch, frames, CONFIG.vae.latent_channels, size, size, generator=gen, dtype=dtype)
              for _ in range(3)]
    t = torch.rand(batch, generator=gen, dtype=dtype)
    inputs = dict(z_t=latent[0], masked=latent[1], reference=latent[2],
                  audio=torch.randn(batch, frames, audio.window_mels, audio.dim, generator=gen, dtype=dtype),
                  codes=torch.randint(0, audio.codes, (batch, frames), generator=gen), t=t,
                  r=t * torch.rand(batch, generator=gen))
    return {name: value.to(device) for name, value in inputs.items()}


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
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v.is_floating_point() and k not in ("t", "r")}
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,frames", [(1, 1), (2, 3)])
def test_our_ops_match_reference_ops_forward_and_backward(batch, frames, device, monkeypatch):
    """The same weights on the kernels and on musetalk_fast/reference.py: outputs and every gradient
    (parameters, latents, audio; the indexer's KL loss included) agree to float32 tolerance."""
    unet = make_unet(device=device)
    inputs = make_inputs(batch, frames, device=device)
    weight = torch.randn(inputs["z_t"].shape, generator=torch.Generator().manual_seed(2)).to(device)
    calls = count_reference_calls(monkeypatch)
    with torch.backends.cudnn.flags(allow_tf32=False):  # exact float32 convolutions on both sides
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


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_temporal_attention_when_frames_exceed_topk(device, monkeypatch):
    """F > temporal_topk: each frame reads its top-k frames chosen by the lightning indexer (eval mode).
    Random indexer weights give exact ties (relu(q.k) = 0 on every head), which the kernel and the reference
    may break differently; so the reference run takes the kernel's choice after checking that it is a top-k
    of the reference logits, and everything else runs on the reference ops."""
    unet = make_unet(device=device).eval()
    frames = CONFIG.unet.temporal_topk + 1
    inputs = make_inputs(1, frames, device=device)
    checked = []

    def kernel_choice_checked(q, k, k_scale, weights, ks, ke, topk):
        chosen = torch.ops.musetalk_fast.lightning_indexer_topk(q, k, k_scale, weights, ks, ke, topk)
        logits = reference.lightning_indexer(q, k, k_scale, weights, ks, ke)
        best = logits.topk(topk, dim=1).values
        torch.testing.assert_close(logits.gather(1, chosen.long()).sort(dim=1, descending=True).values, best)
        checked.append(chosen.shape[0])
        return chosen

    monkeypatch.setattr(reference, "lightning_indexer_topk", kernel_choice_checked)
    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False):
        out = unet(**inputs)
        with ops.use_reference_ops():
            ref_out = unet(**inputs)
    assert len(checked) == len([m for m in unet.modules() if isinstance(m, blocks.TemporalAttention)])
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


def test_indexer_loss_only_in_training_and_the_model_copies():
    unet = MuseTalkUNet(CONFIG)
    unet.gradient_checkpointing = True
    inputs = make_inputs(1, 2)
    unet(**inputs).sum().backward()
    assert unet.indexer_loss() is not None and unet.indexer_loss().requires_grad
    copied = copy.deepcopy(unet)  # e.g. EMA weights: no graph tensor is left on the modules
    assert copied.indexer_loss() is None
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
    (lambda inputs: {**inputs, "mask": torch.ones(2, 3, 2, 16, 16)}, ValueError,
     r"mask must broadcast to \[B, F, 1, h, w\] = \[2, 3, 1, 16, 16\], got \[2, 3, 2, 16, 16\]"),
    (bad("r", lambda x: x.view(2, 1)), ValueError, r"r must have shape \[B\] = \[2\]"),
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


def test_model_benchmark_cases_run():
    """bench/model.py's rows build and run on the CPU (tiny config); timings are the benchmark's job."""
    from musetalk_fast.bench import model as bench

    step, pmf_step, generate = bench.cases("cpu", inference_frames=2)
    assert step.flops > 0 and pmf_step.flops > step.flops and generate.flops > 0 and generate.items == 2
    assert pmf_step.op == "pmf train step"
    step.ours["ours"]()
    step.baselines["reference ops"]()
    assert not ops.reference_ops_enabled()
    calls = []  # the pmf step takes the JVP: the U-Net's forward, then two finite-difference forwards
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.append(args[0].shape[0]) if isinstance(module, MuseTalkUNet) else None)
    try:
        pmf_step.ours["ours"]()
    finally:
        hook.remove()
    assert calls == [1, 1, 1]  # B = 1 on the CPU: its one row has r < t
    pmf_step.baselines["reference ops"]()
    t, r = bench.fixed_times(4)
    assert (r[0] < t[0]) and torch.equal(r[1:3], t[1:3]) and (t[3], r[3]) == (1, 0)
    images = generate.ours["ours"]()
    assert images.shape == (1, 2, 3, CONFIG.image_size, CONFIG.image_size)


@pytest.mark.parametrize("frames", [3, 6])  # all frames visible (dense); more frames than topk = 4 (sparse)
def test_temporal_indexer_loss_on_a_strided_subset(frames, monkeypatch):
    """TemporalDSAttention's indexer loss = DSAttention's on just the chosen position sequences; with every
    sequence chosen, = DSAttention's on all of them."""
    from musetalk_fast.nn import DSAttention

    torch.manual_seed(4)
    kwargs = dict(hidden_size=64, num_heads=2, head_dim=32, topk=4, index_heads=2, index_head_dim=32,
                  index_fp8=False, causal=False, temporal=True)
    ours, plain = blocks.TemporalDSAttention(**kwargs), DSAttention(**kwargs)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(1, frames, 10, 64)
    monkeypatch.setattr(blocks, "INDEXER_LOSS_SEQUENCES", 4)  # 10 positions: stride 3, positions 0, 3, 6, 9
    out = ours(x)
    plain(x[:, :, ::3])
    torch.testing.assert_close(ours.indexer_loss, plain.indexer_loss)
    torch.testing.assert_close(out, plain(x))  # the attention itself is DSAttention's
    monkeypatch.setattr(blocks, "INDEXER_LOSS_SEQUENCES", 100)
    ours(x)
    torch.testing.assert_close(ours.indexer_loss, plain.indexer_loss)


def test_exact_jvp_on_reference_ops_matches_central_differences():
    """torch.func.jvp runs through the U-Net on the reference ops (float64), the trainer's check of its
    finite-difference JVP along (dz_t, dt) = (v, 1); a central difference of step 1e-4 agrees closely."""
    unet = make_unet().double()
    inputs = make_inputs(1, 2, dtype=torch.float64)
    inputs["r"] = inputs["t"].clone()  # r = t: the difference steps t past r
    v = torch.randn(inputs["z_t"].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def x_pred(z_t, t):
        return unet(**{**inputs, "z_t": z_t, "t": t})

    with ops.use_reference_ops():
        _, tangent = torch.func.jvp(x_pred, (inputs["z_t"], inputs["t"]), (v, torch.ones_like(inputs["t"])))
    step = 1e-4
    with torch.no_grad():
        difference = (x_pred(inputs["z_t"] + step * v, inputs["t"] + step)
                      - x_pred(inputs["z_t"] - step * v, inputs["t"] - step)) / (2 * step)
    torch.testing.assert_close(difference, tangent, atol=1e-4 * tangent.abs().max().item(), rtol=0)


def test_mask_channel_default_is_the_lower_half_and_taller_masks_change_the_output():
    """The default mask channel is media's latent-size lower_half_mask; stage 2's taller masks are an input."""
    from musetalk_fast.model.vae import lower_half_mask

    unet = make_unet().eval()
    inputs = make_inputs(2, 2)
    size = CONFIG.latent_size
    with torch.no_grad():
        default = unet(**inputs)
        explicit = unet(**inputs, mask=lower_half_mask(size))
        taller = unet(**inputs, mask=lower_half_mask(size, torch.tensor([2, 2])).view(2, 1, 1, size, size))
    torch.testing.assert_close(explicit, default, atol=0, rtol=0)
    assert (taller - default).abs().max() > 1e-3

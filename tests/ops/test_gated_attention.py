"""gated_attention: CPU C++ kernel and Triton kernel vs the reference, forward and all four
gradients, over random shapes (L != S, odd lengths, GQA/MQA, head-wise gates, the transposed
layout); gradcheck, opcheck, torch.compile, bad input."""
import os
import random

import pytest
import torch

import musetalk_fast
from musetalk_fast import reference
from tests.helpers import (DEVICES, HAS_CUDA, TRITON_INTERPRETED, assert_close_to_reference, backend_device,
                           float_arguments_as_on_a_gpu, kernel_backends, seeded)


def random_cases(count, seed, max_len):
    """(B, Hq, Hkv, L, S, D, causal, head_wise, transposed), shapes drawn with a fixed seed."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        q_heads = rng.choice([1, 4, 8])
        kv_heads = rng.choice([h for h in (1, 2, 4, 8) if q_heads % h == 0])
        cases.append((rng.randint(1, 2), q_heads, kv_heads, rng.randint(1, max_len), rng.randint(1, max_len),
                      rng.choice([16, 32, 64]), rng.random() < 0.5, rng.random() < 0.3, rng.random() < 0.3))
    return cases


EDGE_CASES = [
    (1, 1, 1, 1, 1, 16, False, False, False),  # one query, one key
    (1, 8, 1, 7, 33, 64, True, False, False),  # MQA, causal with L < S
    (1, 8, 2, 33, 7, 32, True, True, True),  # causal with L > S, head-wise gate, transposed
    (2, 4, 4, 16, 16, 128, True, False, True),  # D = 128, exact block
    (1, 2, 1, 5, 0, 16, False, False, False),  # no keys: out = 0
    (1, 2, 2, 0, 9, 16, True, False, False),  # no queries
    (0, 2, 1, 4, 4, 16, False, False, False),  # empty batch
    (1, 2, 1, 9, 11, 24, False, False, False),  # D not a power of two
    (1, 2, 1, 64, 64, 32, True, False, False),  # whole blocks: the kernels' unmasked stages
    (1, 4, 2, 70, 45, 16, True, True, True),  # causal L > S over several blocks, ragged ends
    (1, 2, 1, 9, 11, 6, True, False, False),  # rows of 12 or 24 bytes: pointer loads, not descriptors (TMA)
]
CASES = EDGE_CASES + random_cases(14, seed=2026, max_len=48)


def make_inputs(case, dtype, device, seed):
    batch, q_heads, kv_heads, q_len, kv_len, head_dim, _, head_wise, transposed = case
    gen = seeded(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def bhld(b, h, n, d):  # [B, H, N, D], as a transposed [B, N, H, D] view when asked
        t = randn(b, n, h, d).transpose(1, 2) if transposed else randn(b, h, n, d)
        return t.to(dtype).to(device)

    q = bhld(batch, q_heads, q_len, head_dim)
    k = bhld(batch, kv_heads, kv_len, head_dim)
    v = bhld(batch, kv_heads, kv_len, head_dim)
    gate = bhld(batch, q_heads, q_len, 1 if head_wise else head_dim)
    return q, k, v, gate


def run_kernel(backend, q, k, v, gate, grad, is_causal):
    """(out, dq, dk, dv, dgate) through the op (cpu, cuda) or the Triton launchers (interpreter)."""
    if backend == "triton-interpreter":
        from musetalk_fast.kernels.gated_attention import gated_attention_backward, gated_attention_forward

        out, lse = gated_attention_forward(q, k, v, gate, is_causal)
        return (out, *gated_attention_backward(grad, q, k, v, gate, out, lse, is_causal))
    inputs = [t.detach().requires_grad_() for t in (q, k, v, gate)]
    out = musetalk_fast.ops.gated_attention(*inputs, is_causal=is_causal)
    return (out, *torch.autograd.grad(out, inputs, grad))


def reference_outputs(q, k, v, gate, grad, is_causal, dtype):
    """Reference forward and gradients computed at `dtype` (float64 for the exact answer)."""
    inputs = [t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v, gate)]
    if dtype in (torch.float16, torch.bfloat16):
        out = attention_at_dtype(*inputs, is_causal)
    else:
        out = reference.gated_attention(*inputs, is_causal=is_causal)
    return (out, *torch.autograd.grad(out, inputs, grad.cpu().to(dtype)))


def attention_at_dtype(q, k, v, gate, is_causal):
    """The same math, every op in the inputs' dtype (FlashAttention's low-precision baseline)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if is_causal:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    attn = torch.softmax(scores, dim=-1) @ v if k.shape[2] else torch.zeros_like(q)
    return attn * torch.sigmoid(gate)


def saved_output_rounding_error(q, k, v, gate, grad, is_causal, dtype):
    """The dq, dk error that the design of docs/ops.md §4 adds by design: the backward's delta = rowsum(dY * Y) reads
    Y stored at `dtype`. With d_delta that rounding, dS changes by -P * d_delta (times the scale)."""
    q, k, v, gate, grad = (t.detach().cpu().double() for t in (q, k, v, gate, grad))
    out = reference.gated_attention(q, k, v, gate, is_causal)
    d_delta = (grad * (out.to(dtype).double() - out)).sum(-1, keepdim=True)
    group = q.shape[1] // k.shape[1]
    k_rep = k.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5
    scores = q @ k_rep.transpose(-1, -2) * scale
    if is_causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    ds = -torch.softmax(scores, dim=-1) * d_delta * scale if k.shape[2] else scores
    dq_error = ds @ k_rep
    dk_error = (ds.transpose(-1, -2) @ q).unflatten(1, (k.shape[1], group)).sum(2)
    return [0.0, *(e.abs().max().item() if e.numel() else 0.0 for e in (dq_error, dk_error)), 0.0, 0.0]


NAMES = ("out", "dq", "dk", "dv", "dgate")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_float32_matches_reference(backend, case):
    device = backend_device(backend)
    q, k, v, gate = make_inputs(case, torch.float32, device, seed=1)
    is_causal = case[6]
    grad = torch.randn(q.shape, generator=seeded(2), dtype=torch.float64).to(torch.float32).to(device)
    got = run_kernel(backend, q, k, v, gate, grad, is_causal)
    exact = reference_outputs(q, k, v, gate, grad, is_causal, torch.float64)
    for name, g, e in zip(NAMES, got, exact):
        assert g.dtype == torch.float32
        assert_close_to_reference(g, e, name=name, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES[:4] + CASES[8:16], ids=str)
def test_half_precision_matches_reference(backend, dtype, case):
    device = backend_device(backend)
    q, k, v, gate = make_inputs(case, dtype, device, seed=3)
    is_causal = case[6]
    grad = torch.randn(q.shape, generator=seeded(4), dtype=torch.float64).to(dtype).to(device)
    got = run_kernel(backend, q, k, v, gate, grad, is_causal)
    exact = reference_outputs(q, k, v, gate, grad, is_causal, torch.float64)
    same_math = reference_outputs(q, k, v, gate, grad, is_causal, dtype)
    by_design = saved_output_rounding_error(q, k, v, gate, grad, is_causal, dtype)
    for name, g, e, s, extra in zip(NAMES, got, exact, same_math, by_design):
        assert g.dtype == dtype
        assert_close_to_reference(g, e, s, name=name, extra_allowance=extra)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_far_negative_scores_give_finite_gradients(backend, dtype, is_causal):
    """Every score about -144 (lse below float32's exp overflow at -88) and S = 7, not a multiple of any key
    block: the padding key rows, loaded as zeros with score 0, must not turn exp(-lse) into inf and dQ into
    0 * inf = NaN."""
    device = backend_device(backend)
    q = torch.full((1, 2, 5, 16), 6.0, dtype=dtype, device=device)
    k = torch.full((1, 2, 7, 16), -6.0, dtype=dtype, device=device)
    v = torch.randn(1, 2, 7, 16, generator=seeded(5)).to(dtype).to(device)
    gate = torch.randn(1, 2, 5, 16, generator=seeded(6)).to(dtype).to(device)
    grad = torch.randn(1, 2, 5, 16, generator=seeded(7)).to(dtype).to(device)
    got = run_kernel(backend, q, k, v, gate, grad, is_causal)
    exact = reference_outputs(q, k, v, gate, grad, is_causal, torch.float64)
    for name, g, e in zip(NAMES, got, exact):
        assert torch.isfinite(g.float()).all(), f"{name} is not finite"
        tolerance = 2e-5 if dtype == torch.float32 else 2e-2
        assert_close_to_reference(g, e, name=name, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case", [(2, 4, 2, 13, 21, 16, True, False, True), (1, 2, 1, 40, 33, 24, False, True, False)],
                         ids=str)
def test_float64_and_lse(backend, case):
    """float64 in, float64 out on every backend (the GPU's exact path for gradcheck), lse included."""
    device = backend_device(backend)
    q, k, v, gate = make_inputs(case, torch.float64, device, seed=5)
    is_causal = case[6]
    if backend == "triton-interpreter":
        from musetalk_fast.kernels.gated_attention import gated_attention_forward

        out, lse = gated_attention_forward(q, k, v, gate, is_causal, 0.3)
    else:
        out, lse = torch.ops.musetalk_fast.gated_attention_forward(q, k, v, gate, is_causal, 0.3)
    ref_out, ref_lse = reference.gated_attention_with_lse(q, k, v, gate, is_causal, 0.3)
    assert out.dtype == lse.dtype == torch.float64 and out.is_contiguous()
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-10)
    grad = torch.randn(q.shape, generator=seeded(12), dtype=torch.float64).to(device)
    got = run_kernel(backend, q, k, v, gate, grad, is_causal)
    exact = reference_outputs(q, k, v, gate, grad, is_causal, torch.float64)
    for name, g, e in zip(NAMES, got, exact):
        assert g.dtype == torch.float64
        assert_close_to_reference(g, e, name=name, atol=1e-12, rtol=1e-10)


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="emulates on CPU tensors what a GPU launch does to float arguments")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize("case", [(2, 4, 2, 13, 21, 16, True, False, True), (1, 2, 1, 40, 33, 24, False, True, False)],
                         ids=str)
def test_float64_exact_when_float_arguments_arrive_as_float32(monkeypatch, case, deterministic):
    """On a GPU the kernels' float arguments (qk_scale, scale) are float32: float64 inputs must still get
    their scales exactly (kernels/float64_scalars.py), in the forward, the backward and the dQ kernel."""
    from musetalk_fast.kernels import gated_attention as ga

    for name in ("gated_attention_fwd_kernel", "gated_attention_bwd_kernel", "gated_attention_bwd_dq_kernel"):
        monkeypatch.setattr(ga, name, float_arguments_as_on_a_gpu(getattr(ga, name)))
    q, k, v, gate = make_inputs(case, torch.float64, "cpu", seed=5)
    is_causal = case[6]
    grad = torch.randn(q.shape, generator=seeded(12), dtype=torch.float64)
    out, lse = ga.gated_attention_forward(q, k, v, gate, is_causal, 0.3)
    got = (out, *ga.gated_attention_backward(grad, q, k, v, gate, out, lse, is_causal, 0.3, deterministic))
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v, gate)]
    ref_out, ref_lse = reference.gated_attention_with_lse(*inputs, is_causal, 0.3)
    exact = (ref_out, *torch.autograd.grad(ref_out, inputs, grad))
    torch.testing.assert_close(lse, ref_lse.detach(), atol=1e-12, rtol=1e-10)
    for name, g, e in zip(NAMES, got, exact):
        torch.testing.assert_close(g, e.detach(), atol=1e-12, rtol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_causal,head_wise", [(False, False), (True, True), (True, False)])
def test_gradcheck_float64(device, is_causal, head_wise):
    case = (1, 4, 2, 5, 7, 8, is_causal, head_wise, False)
    inputs = [t.requires_grad_() for t in make_inputs(case, torch.float64, device, seed=6)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, g: musetalk_fast.ops.gated_attention(q, k, v, g, is_causal=is_causal), inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    case = (1, 4, 2, 6, 9, 16, True, True, True)
    q, k, v, gate = [t.requires_grad_() for t in make_inputs(case, torch.float32, device, seed=7)]
    torch.library.opcheck(torch.ops.musetalk_fast.gated_attention_forward.default, (q, k, v, gate, True, None))
    out, lse = torch.ops.musetalk_fast.gated_attention_forward(q, k, v, gate, True, None)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), gate.detach(), out.detach(), lse, True, None)
    torch.library.opcheck(torch.ops.musetalk_fast.gated_attention_backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    case = (1, 4, 1, 8, 8, 16, True, False, False)
    inputs = make_inputs(case, torch.float32, device, seed=8)

    def loss_fn(q, k, v, gate):
        return musetalk_fast.ops.gated_attention(q, k, v, gate, is_causal=True).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in inputs]
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    eager_leaves = [t.clone().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(loss_fn(*eager_leaves), eager_leaves)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_lse_is_not_differentiable():
    q, k, v, gate = [t.requires_grad_() for t in make_inputs((1, 1, 1, 3, 3, 16, False, False, False),
                                                            torch.float32, "cpu", seed=9)]
    _, lse = torch.ops.musetalk_fast.gated_attention_forward(q, k, v, gate, False, None)
    assert not lse.requires_grad


def _good(**changes):
    shapes = dict(q=(1, 4, 5, 16), k=(1, 2, 6, 16), v=(1, 2, 6, 16), gate=(1, 4, 5, 16))
    tensors = {name: torch.randn(*shape) for name, shape in shapes.items()}
    tensors.update(changes)
    return tensors


# Each kind of bad input with its whole message: the C++ checks (CPU tensors) and the Python checks
# (CUDA tensors, fake tensors under torch.compile) must say exactly this. The integers in these
# messages are what a second, static libstdc++ in the extension cut short or crashed on.
BAD_INPUTS = [
    (_good(k=torch.randn(1, 2, 6, 32), v=torch.randn(1, 2, 6, 32)), ValueError,
     "k head dim 32 must equal q head dim 16"),
    (_good(k=torch.randn(1, 3, 6, 16), v=torch.randn(1, 3, 6, 16)), ValueError,
     "q heads (4) must be a multiple of k/v heads (3)"),
    (_good(gate=torch.randn(1, 4, 5, 8)), ValueError, "gate must have shape [1, 4, 5, 16] or [B, Hq, L, 1], got [1, 4, 5, 8]"),
    (_good(gate=torch.randn(1, 4, 5)), ValueError, "gate must have rank 4, got shape [1, 4, 5]"),
    (_good(v=torch.randn(1, 2, 7, 16)), ValueError, "v must have k's shape [1, 2, 6, 16], got [1, 2, 7, 16]"),
    (_good(k=torch.randn(2, 2, 6, 16), v=torch.randn(2, 2, 6, 16)), ValueError, "k batch 2 must equal q batch 1"),
    (_good(v=torch.randn(1, 2, 6, 16, dtype=torch.float64)), TypeError, "v must have q's dtype float32, got float64"),
    (_good(q=torch.randint(0, 3, (1, 4, 5, 16))), TypeError,
     "q must be float16, bfloat16, float32 or float64, got int64"),
]


@pytest.mark.parametrize("device", DEVICES + ["fake"])
@pytest.mark.parametrize("tensors,error,message", BAD_INPUTS, ids=[b[2][:24] for b in BAD_INPUTS])
def test_bad_input_raises_the_whole_message(device, tensors, error, message):
    """On every device, and on the fake tensors torch.compile traces with: the same full message."""
    if device == "fake":
        with pytest.raises(error) as raised, torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            musetalk_fast.ops.gated_attention(**{n: mode.from_tensor(t) for n, t in tensors.items()})
    else:
        with pytest.raises(error) as raised:
            musetalk_fast.ops.gated_attention(**{n: t.to(device) for n, t in tensors.items()})
    assert str(raised.value).splitlines()[0] == message


def test_backward_bad_input_raises_the_whole_message():
    q, k, v, gate = (_good()[n] for n in ("q", "k", "v", "gate"))
    out, lse = torch.ops.musetalk_fast.gated_attention_forward(q, k, v, gate, False, None)
    for device in DEVICES:
        args = [t.to(device) for t in (torch.randn_like(out), q, k, v, gate, out, lse[..., :3])]
        with pytest.raises(ValueError) as raised:
            torch.ops.musetalk_fast.gated_attention_backward(*args, False, None)
        assert str(raised.value).splitlines()[0] == "lse must have shape [B, Hq, L] = [1, 4, 5], got [1, 4, 3]"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_mixed_devices_are_rejected():
    tensors = _good()
    tensors["k"] = tensors["k"].cuda()
    with pytest.raises(ValueError, match="k must be on q's device cpu, got cuda:0"):
        musetalk_fast.ops.gated_attention(**tensors)


def test_cpu_kernel_over_several_row_chunks():
    """G * L = 1200 rows: more than one of the CPU kernel's 512-row score chunks."""
    case = (1, 4, 1, 300, 290, 16, True, False, False)
    q, k, v, gate = make_inputs(case, torch.float64, "cpu", seed=10)
    grad = torch.randn(q.shape, generator=seeded(11), dtype=torch.float64)
    got = run_kernel("cpu", q, k, v, gate, grad, True)
    exact = reference_outputs(q, k, v, gate, grad, True, torch.float64)
    for name, g, e in zip(NAMES, got, exact):
        assert_close_to_reference(g, e, name=name, atol=1e-12, rtol=1e-10)


def test_mixed_devices_are_rejected_on_any_machine():
    tensors = _good()
    tensors["k"] = tensors["k"].to("meta")
    with pytest.raises(ValueError, match="k must be on q's device"):
        musetalk_fast.ops.gated_attention(**tensors)


# The new backward's modes and the data-movement choice --------------------------------------------


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case", [EDGE_CASES[2], EDGE_CASES[9], (1, 4, 1, 40, 33, 32, False, False, True)], ids=str)
def test_deterministic_backward_matches_reference_and_repeats_bitwise(backend, case):
    """Deterministic mode (dQ by the fixed-order kernel) against the reference; two runs bitwise equal."""
    from musetalk_fast.ops import set_gated_attention_deterministic

    device = backend_device(backend)
    q, k, v, gate = make_inputs(case, torch.float32, device, seed=13)
    grad = torch.randn(q.shape, generator=seeded(14), dtype=torch.float64).to(torch.float32).to(device)
    exact = reference_outputs(q, k, v, gate, grad, case[6], torch.float64)
    if backend == "triton-interpreter":
        from musetalk_fast.kernels.gated_attention import gated_attention_backward, gated_attention_forward

        out, lse = gated_attention_forward(q, k, v, gate, case[6])
        runs = [(out, *gated_attention_backward(grad, q, k, v, gate, out, lse, case[6], deterministic=True))
                for _ in range(2)]
    else:
        previous = set_gated_attention_deterministic(True)
        try:
            runs = [run_kernel(backend, q, k, v, gate, grad, case[6]) for _ in range(2)]
        finally:
            set_gated_attention_deterministic(previous)
    for name, g, again, e in zip(NAMES, *runs, exact):
        assert_close_to_reference(g, e, name=name, atol=2e-5, rtol=1e-5)
        assert torch.equal(g, again), name


SPLIT_CASES = [  # (dtype, case): the head dim split into chunks by the backward's shipped config
    (torch.float32, (1, 4, 2, 37, 29, 80, True, False, False)),  # D 80 in 32-dim chunks: a ragged last one
    (torch.float64, (1, 2, 1, 20, 35, 40, False, True, True)),  # 16-dim chunks, head-wise gate, transposed
    (torch.bfloat16, (1, 2, 1, 19, 33, 196, True, False, False)),  # rows of 392 B: pointer path, D256 in 64s
]


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="runs the Triton kernels on CPU tensors")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize("dtype,case", SPLIT_CASES, ids=str)
def test_shipped_configs_with_a_split_head_dim(monkeypatch, dtype, case, deterministic):
    """The configs a GPU gets (the heuristic) instead of the interpreter's smallest ones, where the
    backward splits the head dim (SPLIT_D): float32 and float64 (16 x 16 tiles), and the bf16 pointer
    path at D256 (16 x 64 tiles); against the float64 reference."""
    from musetalk_fast.kernels import gated_attention as ga

    for configs in (ga.FWD, ga.BWD, ga.DQ):
        monkeypatch.setattr(configs, "smallest", lambda match, configs=configs: configs.heuristic_config(match))
        monkeypatch.setattr(configs, "_chosen", {})
    q, k, v, gate = make_inputs(case, dtype, "cpu", seed=15)
    match = dict(dtype=ga.DTYPE_NAMES[dtype], D=triton_block(case[5]), causal=case[6],
                 tma=ga._descriptors_allowed(q, k, v))
    assert ga.BWD.heuristic_config(match)["SPLIT_D"] < match["D"]  # the head dim is split
    grad = torch.randn(q.shape, generator=seeded(16), dtype=torch.float64).to(dtype)
    out, lse = ga.gated_attention_forward(q, k, v, gate, case[6])
    got = (out, *ga.gated_attention_backward(grad, q, k, v, gate, out, lse, case[6], deterministic=deterministic))
    exact = reference_outputs(q, k, v, gate, grad, case[6], torch.float64)
    if dtype == torch.bfloat16:
        same_math = reference_outputs(q, k, v, gate, grad, case[6], dtype)
        by_design = saved_output_rounding_error(q, k, v, gate, grad, case[6], dtype)
        for name, g, e, same, extra in zip(NAMES, got, exact, same_math, by_design):
            assert g.dtype == dtype
            assert_close_to_reference(g, e, same, name=name, extra_allowance=extra)
        return
    for name, g, e in zip(NAMES, got, exact):
        assert g.dtype == dtype
        tolerance = 1e-5 if dtype == torch.float32 else 1e-10
        assert_close_to_reference(g, e, name=name, atol=2 * tolerance, rtol=tolerance)


def triton_block(head_dim):
    return max(1 << (head_dim - 1).bit_length(), 16)


def test_deterministic_mode_follows_torch():
    from musetalk_fast.ops.gated_attention import deterministic_backward, set_gated_attention_deterministic

    assert not deterministic_backward()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert deterministic_backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert set_gated_attention_deterministic(True) is False and deterministic_backward()
    assert set_gated_attention_deterministic(False) is True and not deterministic_backward()


def test_descriptor_rules_pick_the_layouts():
    """Tensor descriptors (TMA) for contiguous and [B, L, H, D]-transposed 16-byte-aligned rows;
    pointer loads for rows of a size not a multiple of 16 bytes or a strided last dim."""
    from musetalk_fast.kernels.gated_attention import _descriptors_allowed

    if not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("no Triton backend here")
    device = "cuda" if HAS_CUDA else "cpu"
    bhld = torch.randn(2, 4, 8, 32, device=device)
    assert _descriptors_allowed(bhld, bhld.transpose(1, 2).contiguous().transpose(1, 2)) == (
        not HAS_CUDA or torch.cuda.get_device_capability()[0] >= 9)
    assert not _descriptors_allowed(torch.randn(2, 4, 8, 6, device=device))  # 24-byte rows
    assert not _descriptors_allowed(bhld[..., ::2])  # last dim not contiguous
    assert not _descriptors_allowed(bhld[:, :, :1].expand(2, 4, 8, 32))  # a broadcast row


# Varlen: packed sequences -----------------------------------------------------------------------

VARLEN_CASES = [  # (q lengths, k lengths, Hq, Hkv, D, causal, head_wise)
    ([5, 0, 17], [7, 3, 12], 4, 2, 16, True, False),  # an empty query sequence, L != S per sequence
    ([9, 4], [0, 11], 2, 1, 32, False, True),  # a sequence with no key, head-wise gate
    ([33, 20, 1], [33, 20, 1], 2, 2, 16, True, False),  # self-attention lengths over several blocks
]


def make_varlen_inputs(case, dtype, device, seed):
    lengths_q, lengths_k, q_heads, kv_heads, head_dim, _, head_wise = case
    gen = seeded(seed)
    total_q, total_k = sum(lengths_q), sum(lengths_k)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    def cumulative(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)

    q, k, v = randn(total_q, q_heads, head_dim), randn(total_k, kv_heads, head_dim), randn(total_k, kv_heads, head_dim)
    gate = randn(total_q, q_heads, 1 if head_wise else head_dim)
    return q, k, v, gate, cumulative(lengths_q), cumulative(lengths_k), max(lengths_q), max(lengths_k)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", VARLEN_CASES, ids=str)
def test_varlen_matches_reference(backend, dtype, case):
    device = backend_device(backend)
    q, k, v, gate, cu_q, cu_k, max_q, max_k = make_varlen_inputs(case, dtype, device, seed=15)
    is_causal = case[5]
    grad = torch.randn(q.shape, generator=seeded(16), dtype=torch.float64).to(dtype).to(device)
    if backend == "triton-interpreter":
        from musetalk_fast.kernels import gated_attention as kernels

        out, lse = kernels.gated_attention_varlen_forward(q, k, v, gate, cu_q, cu_k, max_q, max_k, is_causal)
        got = (out, *kernels.gated_attention_varlen_backward(grad, q, k, v, gate, out, lse, cu_q, cu_k, max_q, max_k,
                                                             is_causal))
    else:
        inputs = [t.detach().requires_grad_() for t in (q, k, v, gate)]
        out = musetalk_fast.ops.gated_attention_varlen(*inputs, cu_q, cu_k, max_q, max_k, is_causal=is_causal)
        got = (out, *torch.autograd.grad(out, inputs, grad))
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v, gate)]
    ref = reference.gated_attention_varlen(*leaves, cu_q.cpu(), cu_k.cpu(), is_causal=is_causal)
    exact = (ref, *torch.autograd.grad(ref, leaves, grad.cpu().double()))
    for name, g, e in zip(NAMES, got, exact):
        assert g.dtype == dtype and g.shape == e.shape
        if dtype == torch.float32:
            assert_close_to_reference(g, e, name=name, atol=2e-5, rtol=1e-5)
        else:  # bf16: the rounding of inputs and outputs, no same-math baseline per sequence here
            torch.testing.assert_close(g.double().cpu(), e, atol=6e-2, rtol=5e-2, msg=lambda m: f"{name}: {m}")


def test_varlen_gradcheck_opcheck_compile():
    case = ([3, 0, 4], [2, 5, 3], 2, 1, 8, True, True)
    q, k, v, gate, cu_q, cu_k, max_q, max_k = make_varlen_inputs(case, torch.float64, "cpu", seed=17)
    leaves = [t.requires_grad_() for t in (q, k, v, gate)]
    assert torch.autograd.gradcheck(
        lambda *t: musetalk_fast.ops.gated_attention_varlen(*t, cu_q, cu_k, max_q, max_k, is_causal=True), leaves)
    args = (*leaves, cu_q, cu_k, max_q, max_k, True, None)
    torch.library.opcheck(torch.ops.musetalk_fast.gated_attention_varlen_forward.default, args)
    out, lse = torch.ops.musetalk_fast.gated_attention_varlen_forward(*args)
    backward_args = (torch.randn_like(out), *(t.detach() for t in leaves), out.detach(), lse, cu_q, cu_k, max_q, max_k,
                     True, None)
    torch.library.opcheck(torch.ops.musetalk_fast.gated_attention_varlen_backward.default, backward_args)

    def loss_fn(q, k, v, gate):
        return musetalk_fast.ops.gated_attention_varlen(q, k, v, gate, cu_q, cu_k, max_q, max_k, True).square().sum()

    compiled = [t.detach().clone().requires_grad_() for t in leaves]
    eager = [t.detach().clone().requires_grad_() for t in leaves]
    grads = torch.autograd.grad(torch.compile(loss_fn, fullgraph=True)(*compiled), compiled)
    for g, e in zip(grads, torch.autograd.grad(loss_fn(*eager), eager)):
        torch.testing.assert_close(g, e)


def _varlen_good(**changes):
    args = dict(q=torch.randn(7, 4, 16), k=torch.randn(9, 2, 16), v=torch.randn(9, 2, 16), gate=torch.randn(7, 4, 16),
                cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32), max_seqlen_q=4, max_seqlen_k=5)
    args.update(changes)
    return args


VARLEN_BAD_INPUTS = [
    (_varlen_good(cu_seqlens_q=torch.tensor([0, 3, 7])), TypeError, "cu_seqlens_q must be int32, got int64"),
    (_varlen_good(cu_seqlens_q=torch.tensor([0, 5, 4, 7], dtype=torch.int32),
                  cu_seqlens_k=torch.tensor([0, 4, 4, 9], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must be non-decreasing"),
    (_varlen_good(cu_seqlens_k=torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError,
     "cu_seqlens_k must run from 0 to 9 (the packed length), got 0 ... 8"),
    (_varlen_good(max_seqlen_k=4), ValueError, "max_seqlen_k (4) must be >= the longest sequence (5)"),
    (_varlen_good(cu_seqlens_k=torch.tensor([0, 9], dtype=torch.int32)), ValueError,
     "cu_seqlens_k must have cu_seqlens_q's shape [3], got [2]"),
    (_varlen_good(gate=torch.randn(7, 4, 2)), ValueError,
     "gate must have shape [7, 4, 16] or [Tq, Hq, 1], got [7, 4, 2]"),
    (_varlen_good(q=torch.randn(1, 7, 4, 16)), ValueError, "q must have rank 3, got shape [1, 7, 4, 16]"),
]


@pytest.mark.parametrize("args,error,message", VARLEN_BAD_INPUTS, ids=[b[2][:24] for b in VARLEN_BAD_INPUTS])
def test_varlen_bad_input_raises_the_whole_message(args, error, message):
    with pytest.raises(error) as raised:
        musetalk_fast.ops.gated_attention_varlen(**args)
    assert str(raised.value).splitlines()[0] == message


def test_varlen_value_checks_read_the_device_once(monkeypatch):
    """The cu_seqlens value checks run before every varlen forward and backward: on a GPU each host read is a
    sync that drains the launch queue, so both tensors' ends and lengths come back in one read."""
    from musetalk_fast.ops.gated_attention import check_varlen_args

    reads = []
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=original, _n=name: reads.append(_n) or _o(self))
    args = _varlen_good()
    names = ("q", "k", "v", "gate", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
    check_varlen_args(*(args[n] for n in names))
    assert reads == ["tolist"]


@pytest.mark.skipif(not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"), reason="no Triton backend here")
def test_varlen_deterministic_backward_equals_the_atomic_one():
    from musetalk_fast.kernels import gated_attention as kernels

    device = "cuda" if HAS_CUDA else "cpu"
    q, k, v, gate, cu_q, cu_k, max_q, max_k = make_varlen_inputs(VARLEN_CASES[0], torch.float32, device, seed=18)
    out, lse = kernels.gated_attention_varlen_forward(q, k, v, gate, cu_q, cu_k, max_q, max_k, True)
    grad = torch.randn_like(out)
    atomic, fixed = (kernels.gated_attention_varlen_backward(grad, q, k, v, gate, out, lse, cu_q, cu_k, max_q, max_k,
                                                             True, deterministic=mode) for mode in (False, True))
    for name, a, f in zip(NAMES[1:], atomic, fixed):
        torch.testing.assert_close(a, f, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")

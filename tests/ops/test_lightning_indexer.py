"""lightning_indexer and fp8_quantize: CPU C++ kernels and Triton kernels vs the reference (fp8, bf16,
fp32, fp64; ragged, causal and empty key ranges; H from 1 to 128, D in {32, 64, 128}), gradients,
gradcheck, opcheck, torch.compile, and bad input with the same whole message from C++ and Python."""
import re

import pytest
import torch

import musetalk_fast
from musetalk_fast import reference
from tests.helpers import (DEVICES, HAS_CUDA, TRITON_INTERPRETED, assert_close_to_reference, backend_device,
                           kernel_backends, seeded)

FP8 = torch.float8_e4m3fn
FLOATS = "float16, bfloat16, float32 or float64"
# (T, S, H, D, key ranges): small for Triton's interpreter, covering padded head counts and every D.
SHAPES = [(5, 37, 3, 32, "ragged"), (9, 9, 1, 64, "causal"), (4, 20, 16, 32, "ragged"), (3, 40, 5, 128, "causal"),
          (2, 19, 128, 32, "ragged"), (6, 33, 64, 32, "packed"), (0, 7, 2, 32, "causal"), (3, 0, 2, 32, "empty"),
          (4, 5, 2, 64, "empty")]


def key_ranges(kind, num_tokens, num_keys, seed):
    """ks, ke [T] int32: every key, causal prefill (ke = t + 1), two packed sequences, random ragged or empty ranges."""
    if kind == "full":
        return torch.zeros(num_tokens, dtype=torch.int32), torch.full((num_tokens,), num_keys, dtype=torch.int32)
    if kind == "causal":
        ke = torch.arange(1, num_tokens + 1).clamp(max=num_keys)
        return torch.zeros_like(ke).int(), ke.int()
    if kind == "packed":  # two sequences in one batch: token t of sequence b sees [start_b, start_b + t + 1)
        half = num_tokens // 2
        t = torch.arange(num_tokens)
        ks = torch.where(t < half, 0, half)
        return ks.int(), (t + 1).clamp(max=num_keys).int()
    if kind == "empty":
        ks = torch.randint(0, num_keys + 1, (num_tokens,), generator=seeded(seed))
        return ks.int(), ks.int()
    a = torch.randint(0, num_keys + 1, (2, num_tokens), generator=seeded(seed))
    return a.min(0).values.int(), a.max(0).values.int()


def make_inputs(shape, dtype, seed, device="cpu"):
    """q, k in `dtype` (fp8 made by torch's rounding, never in a kernel), k_scale > 0, weights of both signs."""
    num_tokens, num_keys, heads, head_dim, kind = shape
    g = seeded(seed)
    q = torch.randn(num_tokens, heads, head_dim, generator=g) * 2
    k = torch.randn(num_keys, head_dim, generator=g) * 2
    k_scale = torch.rand(num_keys, generator=g) + 0.1
    weights = torch.randn(num_tokens, heads, generator=g)
    ks, ke = key_ranges(kind, num_tokens, num_keys, seed)
    if dtype == torch.float64:
        k_scale, weights = k_scale.double(), weights.double()
    return [t.to(device) for t in (q.to(dtype), k.to(dtype), k_scale, weights, ks, ke)]


def skip_extra_gpu_compile(backend, dtype, among_first):
    """On the GPU each (dtype, padded H, D) compiles its own kernels, and `make gpu-check` runs the suite
    under a time cap: there every shape runs in fp8 and the first few in the other dtypes (the
    interpreter and the CPU kernel run them all)."""
    if backend == "cuda" and dtype != FP8 and not among_first:
        pytest.skip("GPU compile budget: this shape runs in fp8 on the GPU")


def run_forward(backend, *args):
    if backend == "triton-interpreter":
        from musetalk_fast.kernels.lightning_indexer import lightning_indexer_forward

        return lightning_indexer_forward(*args)
    return musetalk_fast.ops.lightning_indexer(*args)


def run_backward(backend, grad, q, k, k_scale, weights, ks, ke):
    if backend == "triton-interpreter":
        from musetalk_fast.kernels.lightning_indexer import lightning_indexer_backward

        return lightning_indexer_backward(grad, q, k, k_scale, weights, ks, ke)
    inputs = [t.detach().requires_grad_() for t in (q, k, k_scale, weights)]
    out = musetalk_fast.ops.lightning_indexer(*inputs, ks, ke)
    return torch.autograd.grad(out, inputs, grad)


# Hopper's fp8 tensor cores (wgmma) accumulate in a float with 13 mantissa bits, truncated (SageAttention2
# measured this "FP22" accumulator; DeepSeek-V3 section 3.3.2 reports ~14 bits on the H800), and Triton keeps a
# whole D-long fp8 dot there on sm_90 (its default max_num_imprecise_acc is 2^30): q . k is off by up to ~2^-13
# of its magnitude per 32-deep step, not float32's 2^-24. Emulating that accumulator at the test shapes puts the
# logits within ~1.5e-4 of the largest one (8e-5 .. 1.5e-4 at D128); 1e-3 leaves room for the hardware's exact
# rounding and still fails any wrong key, head or scale. The interpreter and the CPU kernel stay exact (1e-5).
FP8_TENSOR_CORE_RTOL = 1e-3


def logits_rtol(backend, dtype):
    """The bar of assert_logits_match for `dtype` on `backend` (a device name or a kernel backend)."""
    if dtype == torch.float64:
        return 1e-12
    return FP8_TENSOR_CORE_RTOL if dtype == FP8 and backend == "cuda" else 1e-5


def assert_logits_match(got, exact, name, rtol):
    """The same -inf mask, and the finite values within rtol of the reference's magnitude."""
    got, exact = got.double().cpu(), exact.double().cpu()
    assert got.shape == exact.shape
    assert torch.equal(torch.isfinite(got), torch.isfinite(exact)), f"{name}: masks differ"
    finite = torch.isfinite(exact)
    scale = exact[finite].abs().max().item() if finite.any() else 1.0
    torch.testing.assert_close(got[finite], exact[finite], rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [FP8, torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{s[0]}-S{s[1]}-H{s[2]}-D{s[3]}-{s[4]}" for s in SHAPES])
def test_forward_matches_reference(backend, dtype, shape):
    """fp8/bf16 inputs are exact in float32 (products of e4m3 or bf16 values): only the fp32 accumulation
    order differs from the reference, so the bar is 1e-5 relative for all of them."""
    skip_extra_gpu_compile(backend, dtype, shape in SHAPES[:3])
    args = make_inputs(shape, dtype, seed=sum(shape[:4]), device=backend_device(backend))
    out = run_forward(backend, *args)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.is_contiguous()
    exact = reference.lightning_indexer(*[t.cpu() for t in args])
    assert_logits_match(out, exact, f"logits {dtype}", rtol=logits_rtol(backend, dtype))


GRAD_SHAPES = [(5, 37, 3, 32, "ragged"), (9, 9, 1, 64, "causal"), (4, 20, 16, 32, "packed"), (0, 7, 2, 32, "causal")]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=[f"T{s[0]}-S{s[1]}-H{s[2]}-{s[4]}" for s in GRAD_SHAPES])
def test_backward_matches_reference(backend, dtype, shape):
    device = backend_device(backend)
    args = make_inputs(shape, dtype, seed=7 + sum(shape[:4]), device=device)
    exact_in = [t.detach().cpu().double().requires_grad_() for t in args[:4]]
    exact = reference.lightning_indexer(*exact_in, *[t.cpu() for t in args[4:]])
    grad = torch.randn(exact.shape, generator=seeded(3), dtype=torch.float64).masked_fill(~torch.isfinite(exact), 0)
    exact_grads = torch.autograd.grad(exact, exact_in, grad) if exact.numel() else [torch.zeros_like(t) for t in exact_in]
    got = run_backward(backend, grad.to(torch.float64 if dtype == torch.float64 else torch.float32).to(device), *args)
    for name, g, e in zip(("dq", "dk", "dk_scale", "dweights"), got, exact_grads):
        scale = e.abs().max().item() if e.numel() else 1.0
        if dtype == torch.float64:
            tol = dict(rtol=1e-10, atol=1e-10 * scale)
        elif dtype == torch.bfloat16 and name in ("dq", "dk"):  # the tensor cores multiply bf16-rounded p by k (q)
            tol = dict(rtol=1e-2, atol=1e-2 * scale)
        else:  # fp32 arithmetic on exact (fp32- or bf16-valued) inputs
            tol = dict(rtol=1e-5, atol=1e-5 * scale)
        assert_close_to_reference(g, e, name=name, **tol)



def use_shipped_configs(monkeypatch, *configs):
    """Launch with the configs a GPU gets (the heuristic), not the interpreter's smallest ones."""
    for kernel_configs in configs:
        monkeypatch.setattr(kernel_configs, "smallest", lambda match, c=kernel_configs: c.heuristic_config(match))
        monkeypatch.setattr(kernel_configs, "_chosen", {})


EXACT_SHAPES = [(3, 45, 128, 32, "ragged"), (2, 40, 64, 64, "causal"), (5, 70, 3, 128, "ragged")]


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="runs the Triton kernels on CPU tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", EXACT_SHAPES, ids=[f"T{s[0]}-S{s[1]}-H{s[2]}-D{s[3]}-{s[4]}" for s in EXACT_SHAPES])
def test_shipped_exact_configs_match_reference(monkeypatch, dtype, shape):
    """float32 and float64 with their shipped configs: the backward's 16-dim chunks of the score matmuls,
    and past 32 heads the heads 32 at a time (BLOCK_H: dq over programs, dk in a loop); against the
    float64 reference."""
    from musetalk_fast.kernels import lightning_indexer as li

    use_shipped_configs(monkeypatch, li.FWD, li.BWD_DQ, li.BWD_DK)
    match = li._match(torch.empty(1, shape[2], shape[3], dtype=dtype), shape[2])
    if shape[2] > 32:  # the heads are split
        assert li.BWD_DQ.heuristic_config(match)["BLOCK_H"] == li.BWD_DK.heuristic_config(match)["BLOCK_H"] == 32
    args = make_inputs(shape, dtype, seed=sum(shape[:4]), device="cpu")
    exact_in = [t.detach().double().requires_grad_() for t in args[:4]]
    exact = reference.lightning_indexer(*exact_in, *args[4:])
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert_logits_match(li.lightning_indexer_forward(*args), exact, f"logits {dtype}", rtol=tolerance)
    grad = torch.randn(exact.shape, generator=seeded(5), dtype=torch.float64).masked_fill(~torch.isfinite(exact), 0)
    got = li.lightning_indexer_backward(grad.to(dtype), *args)
    for name, g, e in zip(("dq", "dk", "dk_scale", "dweights"), got, torch.autograd.grad(exact, exact_in, grad)):
        tol = dict(rtol=1e-10, atol=1e-10 * e.abs().max().item()) if dtype == torch.float64 else \
            dict(rtol=1e-5, atol=1e-5 * e.abs().max().item())
        assert_close_to_reference(g, e, name=name, **tol)

@pytest.mark.parametrize("device", DEVICES)
def test_fp8_inputs_get_no_gradient_but_weights_do(device):
    q, k, k_scale, weights, ks, ke = make_inputs((4, 9, 2, 32, "causal"), FP8, 5, device)
    weights.requires_grad_()
    k_scale.requires_grad_()
    out = musetalk_fast.ops.lightning_indexer(q, k, k_scale, weights, ks, ke)
    dw, dks = torch.autograd.grad(out.masked_fill(~torch.isfinite(out), 0).sum(), (weights, k_scale))
    exact_in = [t.detach().cpu().requires_grad_() for t in (weights, k_scale)]
    exact = reference.lightning_indexer(q.cpu(), k.cpu(), exact_in[1], exact_in[0], ks.cpu(), ke.cpu())
    want = torch.autograd.grad(exact.masked_fill(~torch.isfinite(exact), 0).sum(), exact_in)
    rtol = logits_rtol(device, FP8)  # both gradients are sums of relu(q . k): the fp8 dot's error on a GPU
    for got, expected in zip((dw, dks), want):
        torch.testing.assert_close(got.cpu(), expected, rtol=rtol, atol=max(1e-5, rtol * expected.abs().max().item()))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    q, k, k_scale, weights, ks, ke = make_inputs((3, 6, 2, 32, "ragged"), torch.float64, 11, device)
    inputs = [t.requires_grad_() for t in (q, k, k_scale, weights)]
    mask = torch.isfinite(reference.lightning_indexer(q.detach(), k.detach(), k_scale.detach(), weights.detach(), ks, ke))

    def finite_logits(*x):  # -inf entries have no gradient; gradcheck needs finite outputs
        return musetalk_fast.ops.lightning_indexer(*x, ks, ke).masked_fill(~mask, 0.0)

    assert torch.autograd.gradcheck(finite_logits, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, FP8):
        q, k, k_scale, weights, ks, ke = make_inputs((4, 7, 3, 32, "ragged"), dtype, 12, device)
        if dtype == torch.float32:
            q.requires_grad_()
            weights.requires_grad_()
        # test_schema compares inputs before and after with arithmetic torch lacks for fp8 on the CPU.
        utils = {} if dtype == torch.float32 else dict(
            test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))
        torch.library.opcheck(torch.ops.musetalk_fast.lightning_indexer.default, (q, k, k_scale, weights, ks, ke),
                              **utils)
        grad = torch.randn(4, 7, device=device)
        torch.library.opcheck(torch.ops.musetalk_fast.lightning_indexer_backward.default,
                              (grad, q.detach(), k, k_scale, weights.detach(), ks, ke), **utils)
    x = torch.randn(3, 64, device=device)
    for block, ue8m0 in ((None, False), (16, True)):
        torch.library.opcheck(torch.ops.musetalk_fast.fp8_quantize.default, (x, block, ue8m0))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    q, k, k_scale, weights, ks, ke = make_inputs((5, 11, 2, 32, "causal"), torch.float32, 13, device)

    def loss_fn(q, weights):
        logits = musetalk_fast.ops.lightning_indexer(q, k, k_scale, weights, ks, ke)
        x_fp8, scale = musetalk_fast.ops.fp8_quantize(q.detach(), None, True)
        return logits.masked_fill(torch.isinf(logits), 0).pow(2).sum() + scale.sum() + x_fp8.float().sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    inputs = [t.clone().requires_grad_() for t in (q, weights)]
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    eager_inputs = [t.clone().requires_grad_() for t in (q, weights)]
    eager = loss_fn(*eager_inputs)
    torch.testing.assert_close(loss, eager)
    for got, want in zip(grads, torch.autograd.grad(eager, eager_inputs)):
        torch.testing.assert_close(got, want)


# fp8_quantize ---------------------------------------------------------------------------------

QUANT_SHAPES = [((4, 64), None), ((2, 3, 128), 32), ((5,), 5), ((3, 40), 8), ((0, 16), None), ((2, 1), None)]


def run_quantize(backend, x, block, ue8m0):
    if backend == "triton-interpreter":
        from musetalk_fast.kernels.lightning_indexer import fp8_quantize

        return fp8_quantize(x, block, ue8m0)
    return musetalk_fast.ops.fp8_quantize(x, block, ue8m0)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("shape,block", QUANT_SHAPES)
def test_fp8_quantize_matches_reference(backend, dtype, ue8m0, shape, block):
    """The scales and the fp8 values exactly (the interpreter's casts aside, below)."""
    x = torch.randn(shape, generator=seeded(len(shape) + (block or 0)), dtype=torch.float64) * 5
    size = block or shape[-1]
    if x.numel() > size:  # an all-zero block: the scale's 1e-4 floor
        x.view(-1)[:size] = 0.0
    x = x.to(dtype).to(backend_device(backend))
    x_fp8, scale = run_quantize(backend, x, block, ue8m0)
    want_fp8, want_scale = reference.fp8_quantize(x.cpu(), block, ue8m0)
    assert x_fp8.dtype == FP8 and x_fp8.shape == x.shape and scale.dtype == torch.float32
    assert torch.equal(scale.cpu(), want_scale)
    got, want = x_fp8.cpu().float(), want_fp8.float()
    if backend == "triton-interpreter":
        # Triton 3.6's interpreter rounds its float -> fp8 casts its own way: ties away from zero, and no
        # carry when a value rounds up into the next binade (64 where the GPU and torch give 128).
        step = torch.ldexp(torch.ones_like(want), torch.frexp(want)[1] - 4)  # e4m3: 3 mantissa bits
        lost_carry = (torch.frexp(want)[0].abs() == 0.5) & (got == want / 2)
        assert ((got - want).abs() <= step).logical_or(lost_carry).all()
    else:
        assert torch.equal(got, want)
    if ue8m0 and scale.numel():
        assert torch.equal(torch.frexp(scale.cpu())[0], torch.full_like(want_scale, 0.5))  # powers of two


# Bad input ----------------------------------------------------------------------------------------

T, H, D, S = 4, 2, 32, 6


def good(**changes):
    args = dict(q=torch.randn(T, H, D), k=torch.randn(S, D), k_scale=torch.rand(S) + 0.1, weights=torch.randn(T, H),
                ks=torch.zeros(T, dtype=torch.int32), ke=torch.arange(1, T + 1, dtype=torch.int32))
    return {**args, **changes}


META = "cpu, got meta"
BAD_INPUTS = [
    (good(q=torch.randint(0, 3, (T, H, D))), TypeError, f"q must be float8_e4m3fn, {FLOATS}, got int64"),
    (good(k=torch.zeros(S, D, dtype=torch.int32)), TypeError, f"k must be float8_e4m3fn, {FLOATS}, got int32"),
    (good(k_scale=torch.rand(S).half()), TypeError, "k_scale must be float32 or float64, got float16"),
    (good(weights=torch.randn(T, H).bfloat16()), TypeError, "weights must be float32 or float64, got bfloat16"),
    (good(ks=torch.zeros(T, dtype=torch.int64)), TypeError, "ks must be int32, got int64"),
    (good(ke=torch.zeros(T)), TypeError, "ke must be int32, got float32"),
    (good(q=torch.randn(T, D)), ValueError, "q must have rank 3, got shape [4, 32]"),
    (good(k=torch.randn(S, 1, D)), ValueError, "k must have rank 2, got shape [6, 1, 32]"),
    (good(q=torch.randn(T, 129, D), weights=torch.randn(T, 129)), ValueError, "q heads must be between 1 and 128, got 129"),
    (good(q=torch.randn(T, 0, D), weights=torch.randn(T, 0)), ValueError, "q heads must be between 1 and 128, got 0"),
    (good(q=torch.randn(T, H, 16), k=torch.randn(S, 16)), ValueError, "q head dim must be 32, 64 or 128, got 16"),
    (good(q=torch.randn(T, H, 256), k=torch.randn(S, 256)), ValueError, "q head dim must be 32, 64 or 128, got 256"),
    (good(k=torch.randn(S, 64)), ValueError, "k head dim 64 must equal q head dim 32"),
    (good(k_scale=torch.rand(5)), ValueError, "k_scale must have shape [S] = [6], got [5]"),
    (good(k_scale=torch.rand(S, 1)), ValueError, "k_scale must have shape [S] = [6], got [6, 1]"),
    (good(weights=torch.randn(T, 3)), ValueError, "weights must have shape [T, H] = [4, 2], got [4, 3]"),
    (good(weights=torch.randn(T)), ValueError, "weights must have shape [T, H] = [4, 2], got [4]"),
    (good(ks=torch.zeros(5, dtype=torch.int32)), ValueError, "ks must have shape [T] = [4], got [5]"),
    (good(ke=torch.ones(T, 1, dtype=torch.int32)), ValueError, "ke must have shape [T] = [4], got [4, 1]"),
    (good(k=torch.randn(S, D, device="meta")), ValueError, f"k must be on q's device {META}"),
    (good(weights=torch.randn(T, H, device="meta")), ValueError, f"weights must be on q's device {META}"),
    (good(ke=torch.ones(T, dtype=torch.int32, device="meta")), ValueError, f"ke must be on q's device {META}"),
    # The values of ks and ke (read only on real tensors: a fake tensor has none).
    (good(ks=torch.tensor([0, 0, 4, 0], dtype=torch.int32)), ValueError, "ks must be <= ke, got ks[2] = 4 > ke[2] = 3"),
    (good(ke=torch.tensor([1, 2, 7, 4], dtype=torch.int32)), ValueError, "ke must be <= S = 6, got ke[2] = 7"),
    (good(ks=torch.tensor([0, -1, 0, 0], dtype=torch.int32)), ValueError, "ks must be >= 0, got ks[1] = -1"),
    (good(ks=torch.tensor([0, 0, 0, 5], dtype=torch.int32)), ValueError, "ks must be <= ke, got ks[3] = 5 > ke[3] = 4"),
    # fp8_quantize
    (dict(x=torch.zeros(4, 32, dtype=torch.int32)), TypeError, f"x must be {FLOATS}, got int32"),
    (dict(x=torch.zeros(4, 32).to(FP8)), TypeError, f"x must be {FLOATS}, got float8_e4m3fn"),
    (dict(x=torch.tensor(1.0)), ValueError, "x must have rank >= 1, got shape []"),
    (dict(x=torch.randn(4, 32), block=0), ValueError, "block must be > 0, got 0"),
    (dict(x=torch.randn(4, 32), block=-8), ValueError, "block must be > 0, got -8"),
    (dict(x=torch.randn(4, 32), block=5), ValueError, "block 5 must divide x's last dim 32"),
    (dict(x=torch.randn(4, 32), block=64), ValueError, "block 64 must divide x's last dim 32"),
    (dict(x=torch.zeros(4, 0)), ValueError,
     "x's last dim must be > 0 when block is None (one block per row), got shape [4, 0]"),
]
DATA_DEPENDENT = ("must be <= ke", "must be <= S", "must be >= 0, got ks[")


def call(args, convert):
    args = {name: convert(t) if isinstance(t, torch.Tensor) else t for name, t in args.items()}
    if "x" in args:
        return musetalk_fast.ops.fp8_quantize(**args)
    return musetalk_fast.ops.lightning_indexer(**args)


def assert_whole_message(device, call, args, error, message):
    """C++ (CPU tensors) and Python (CUDA tensors, the fake tensors torch.compile traces with) say the same
    whole message; the value checks (ks/ke ranges) have nothing to read on fake tensors."""
    if device == "fake":
        if any(part in message for part in DATA_DEPENDENT):
            pytest.skip("a value check: fake tensors have no values")
        with pytest.raises(error, match="^" + re.escape(message) + "$"), \
                torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            call(args, mode.from_tensor)
        return
    with pytest.raises(error) as raised:
        call(args, lambda t: t if t.device.type == "meta" else t.to(device))
    # A meta tensor among tensors moved to `device`: the message names where those are (cuda:0 on a GPU).
    message = message.replace("device cpu, got meta", f"device {torch.empty(0, device=device).device}, got meta")
    assert str(raised.value).splitlines()[0] == message


@pytest.mark.parametrize("device", DEVICES + ["fake"])
@pytest.mark.parametrize("args,error,message", BAD_INPUTS, ids=[b[2][:40] for b in BAD_INPUTS])
def test_bad_input_raises_the_whole_message(device, args, error, message):
    assert_whole_message(device, call, args, error, message)


def test_value_checks_skip_under_torch_compile():
    """ks > ke cannot be seen while tracing: torch.compile traces through, and eager mode still rejects it."""
    args = good(ks=torch.tensor([0, 0, 4, 0], dtype=torch.int32))
    compiled = torch.compile(musetalk_fast.ops.lightning_indexer, fullgraph=True)
    with pytest.raises(ValueError, match=re.escape("ks must be <= ke, got ks[2] = 4 > ke[2] = 3")):
        compiled(**args)


def test_backward_bad_grad_raises_the_whole_message():
    args = good()
    for device in DEVICES:
        moved = {n: t.to(device) for n, t in args.items()}
        with pytest.raises(ValueError) as raised:
            torch.ops.musetalk_fast.lightning_indexer_backward(torch.randn(T, S + 1, device=device), **moved)
        assert str(raised.value).splitlines()[0] == "grad must have shape [T, S] = [4, 6], got [4, 7]"


def test_cpu_kernel_across_query_and_key_blocks():
    """The C++ kernel works in blocks of 64 queries x 2048 keys: more than one of each, ragged ranges."""
    shape = (130, 4200, 2, 32, "ragged")
    args = make_inputs(shape, torch.float32, 21)
    out = musetalk_fast.ops.lightning_indexer(*args)
    exact_in = [t.double().requires_grad_() for t in args[:4]]
    exact = reference.lightning_indexer(*exact_in, *args[4:])
    assert_logits_match(out, exact, "logits", rtol=1e-5)
    grad = torch.randn(exact.shape, generator=seeded(4), dtype=torch.float64).masked_fill(~torch.isfinite(exact), 0)
    got = run_backward("cpu", grad.float(), *args)
    for name, g, e in zip(("dq", "dk", "dk_scale", "dweights"), got, torch.autograd.grad(exact, exact_in, grad)):
        assert_close_to_reference(g, e, name=name, rtol=1e-5, atol=1e-5 * e.abs().max().item())


GPU_SHAPES = [(1024, 1024, 64, 128, "causal"), (1024, 1024, 32, 128, "causal"), (512, 700, 128, 128, "packed"),
              (300, 900, 7, 64, "ragged"), (257, 513, 1, 32, "causal")]


@pytest.mark.skipif(not HAS_CUDA, reason="the GPU's launch configs (the interpreter runs the smallest)")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"T{s[0]}-S{s[1]}-H{s[2]}-D{s[3]}-{s[4]}" for s in GPU_SHAPES])
def test_gpu_heuristic_configs_match_reference(shape):
    """At benchmark-like sizes, with the configs the H100 runs: fp8 logits to FP8_TENSOR_CORE_RTOL (the
    tensor cores' fp8 accumulator); float32 gradients."""
    args = make_inputs(shape, FP8, seed=shape[2], device="cuda")
    exact = reference.lightning_indexer(*[t.cpu() for t in args])
    assert_logits_match(musetalk_fast.ops.lightning_indexer(*args), exact, "fp8 logits", rtol=logits_rtol("cuda", FP8))
    args = make_inputs(shape, torch.float32, seed=shape[2], device="cuda")
    grad = torch.randn(shape[0], shape[1], device="cuda")
    got = run_backward("cuda", grad, *args)
    exact_in = [t.detach().cpu().double().requires_grad_() for t in args[:4]]
    exact = reference.lightning_indexer(*exact_in, *[t.cpu() for t in args[4:]])
    wants = torch.autograd.grad(exact, exact_in, grad.cpu().double().masked_fill(~torch.isfinite(exact), 0))
    for name, g, e in zip(("dq", "dk", "dk_scale", "dweights"), got, wants):
        assert_close_to_reference(g, e, name=name, rtol=1e-5, atol=1e-5 * e.abs().max().item())

"""sparse_attention: CPU C++ kernel and Triton kernels vs the reference, forward (out, lse) and backward
(dq, dk, dv through out and lse), over random shapes: padded rows (-1 tails), empty rows, out-of-range
indices, duplicate-free random indices, MHA/GQA/MQA, Dqk != Dv (MLA's k/v views of one tensor), K not a
power of two, T = 0, S = 0; both dk/dv modes of the Triton backward; gradcheck, opcheck,
torch.compile, bad input."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import musetalk_fast
from musetalk_fast import reference
from tests.helpers import (DEVICES, HAS_CUDA, TRITON_INTERPRETED, assert_close_to_reference, backend_device,
                           float_arguments_as_on_a_gpu, kernel_backends, seeded)

FLOATS = "float16, bfloat16, float32 or float64"


def random_cases(count, seed, max_len):
    """(T, S, Hq, Hkv, Dqk, Dv, K), drawn with a fixed seed."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        kv_heads = rng.choice([1, 2, 4])
        q_heads = kv_heads * rng.choice([1, 2, 3, 8])
        qk_dim = rng.choice([16, 32, 24])
        cases.append((rng.randint(1, max_len), rng.randint(1, max_len), q_heads, kv_heads, qk_dim,
                      rng.choice([qk_dim, 16, 40]), rng.randint(1, 40)))
    return cases


EDGE_CASES = [
    (1, 1, 1, 1, 16, 16, 1),  # one query, one key
    (6, 33, 16, 1, 32, 32, 17),  # MQA, K not a power of two
    (7, 20, 8, 2, 64, 32, 20),  # GQA, Dqk != Dv
    (4, 12, 4, 4, 16, 16, 5),  # MHA
    (0, 9, 4, 2, 16, 16, 3),  # no queries
    (5, 0, 2, 1, 16, 16, 4),  # no keys: every index is "no key"
    (5, 8, 2, 1, 16, 16, 0),  # K = 0: every row empty
    (3, 70, 4, 1, 24, 16, 64),  # one whole tile of slots, D not a power of two
    (4, 10, 24, 1, 16, 16, 7),  # a group of 24 heads: the Triton kernels split it into head blocks
]
CASES = EDGE_CASES + random_cases(8, seed=2026, max_len=48)


def make_indices(tokens, num_keys, kv_heads, topk, gen):
    """Duplicate-free valid keys per row, then -1 padding at the tail of some rows, a few whole rows
    empty, and stray values outside [0, S) (also "no key")."""
    rows = []
    for _ in range(tokens * kv_heads):
        valid = torch.randperm(max(num_keys, 1), generator=gen)[: min(topk, num_keys)]
        row = torch.full((topk,), -1, dtype=torch.int64)
        row[: valid.numel()] = valid[torch.randperm(valid.numel(), generator=gen)]
        rows.append(row)
    indices = torch.stack(rows).view(tokens, kv_heads, topk) if rows else torch.empty(tokens, kv_heads, topk)
    indices = indices.long()
    if indices.numel():
        slots = torch.rand(indices.shape, generator=gen)
        indices[slots > 0.8] = -1  # padding (the -1 of topk_indices)
        indices[slots < 0.05] = num_keys + 3  # out of range: skipped too
        indices[:: 3, 0] = -1  # empty rows
        indices[1:: 4, -1] = -7
    return indices.to(torch.int32)


def make_inputs(case, dtype, device, seed, mla_views=False):
    tokens, num_keys, q_heads, kv_heads, qk_dim, v_dim, topk = case
    gen = seeded(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    q = randn(tokens, q_heads, qk_dim)
    if mla_views:  # MLA: k = kv, v = kv[..., :Dv], one tensor (no copy)
        k = randn(num_keys, kv_heads, qk_dim)
        v = k[..., :v_dim]
    else:
        k, v = randn(num_keys, kv_heads, qk_dim), randn(num_keys, kv_heads, v_dim)
    indices = make_indices(tokens, num_keys, kv_heads, topk, gen).to(device)
    return q, k, v, indices


def upstream_grads(q, v, lse_dtype, seed):
    """Random grad_out and grad_lse (zero where lse is -inf: only finite lse entries are differentiable)."""
    gen = seeded(seed)
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[2], generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(q.shape[:2], generator=gen, dtype=torch.float64)
    return grad_out.to(q.dtype).to(q.device), grad_lse.to(lse_dtype).to(q.device)


def run_kernel(backend, q, k, v, indices, grad_out, grad_lse, deterministic=False):
    """(out, lse, dq, dk, dv) through the op (cpu, cuda) or the Triton launchers (interpreter)."""
    if backend == "triton-interpreter":
        from musetalk_fast.kernels.sparse_attention import sparse_attention_backward, sparse_attention_forward

        out, lse = sparse_attention_forward(q, k, v, indices)
        grad_lse = torch.where(torch.isinf(lse), 0.0, grad_lse)
        return (out, lse, *sparse_attention_backward(grad_out, grad_lse, q, k, v, indices, out, lse,
                                                     deterministic=deterministic))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = musetalk_fast.ops.sparse_attention(*leaves, indices)
    finite = ~torch.isinf(lse.detach())
    loss = (out * grad_out).sum() + (torch.where(finite, lse, 0.0) * grad_lse).sum()
    return (out, lse, *torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))


def reference_outputs(q, k, v, indices, grad_out, grad_lse, at_dtype=None):
    """The reference's (out, lse, dq, dk, dv) in float64, or the same math with every op in `at_dtype`."""
    leaves = [t.detach().cpu().to(at_dtype or torch.float64).requires_grad_() for t in (q, k, v)]
    indices = indices.cpu()
    if at_dtype is None:
        out, lse = reference.sparse_attention(*leaves, indices)
    else:
        out, lse = attention_at_dtype(*leaves, indices)
    finite = ~torch.isinf(lse.detach())
    loss = (out * grad_out.cpu().to(out.dtype)).sum() + (
        torch.where(finite, lse, 0.0) * grad_lse.cpu().to(lse.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True) if loss.requires_grad else [
        torch.zeros_like(t) for t in leaves]
    return (out, lse, *grads)


def attention_at_dtype(q, k, v, indices):
    """The reference's math with every op in the inputs' dtype (FlashAttention's low-precision baseline)."""
    tokens, q_heads, _ = q.shape
    num_keys, kv_heads, _ = k.shape
    valid = (indices >= 0) & (indices < num_keys)
    rows = torch.where(valid, indices, 0).long()
    head = torch.arange(kv_heads)[None, :, None]
    k_sel = k[rows, head] if num_keys else k.new_zeros(*indices.shape, k.shape[2])
    v_sel = v[rows, head] if num_keys else v.new_zeros(*indices.shape, v.shape[2])
    scores = torch.einsum("tgqd,tgkd->tgqk", q.view(tokens, kv_heads, -1, q.shape[2]), k_sel) * q.shape[2] ** -0.5
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("tgqk,tgkd->tgqd", p, v_sel).reshape(tokens, q_heads, v.shape[2])
    return out, lse.reshape(tokens, q_heads)


NAMES = ("out", "lse", "dq", "dk", "dv")


def assert_matches_reference(backend, case, dtype, seed, atol, rtol, mla_views=False):
    """(out, lse, dq, dk, dv) of the kernel on `backend` against the float64 reference, in `dtype`."""
    q, k, v, indices = make_inputs(case, dtype, backend_device(backend), seed=seed, mla_views=mla_views)
    grad_out, grad_lse = upstream_grads(q, v, dtype, seed=seed + 1)
    got = run_kernel(backend, q, k, v, indices, grad_out, grad_lse)
    exact = reference_outputs(q, k, v, indices, grad_out, grad_lse)
    for name, g, e in zip(NAMES, got, exact, strict=True):
        assert g.dtype == dtype
        assert_close_to_reference(g, e, name=name, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_float32_matches_reference(backend, case):
    assert_matches_reference(backend, case, torch.float32, seed=1, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES[1:4] + CASES[8:11], ids=str)
def test_half_precision_matches_reference(backend, dtype, case):
    device = backend_device(backend)
    q, k, v, indices = make_inputs(case, dtype, device, seed=3)
    grad_out, grad_lse = upstream_grads(q, v, torch.float32, seed=4)
    got = run_kernel(backend, q, k, v, indices, grad_out, grad_lse)
    exact = reference_outputs(q, k, v, indices, grad_out, grad_lse)
    same_math = reference_outputs(q, k, v, indices, grad_out, grad_lse, at_dtype=dtype)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for name, g, e, s in zip(NAMES, got, exact, same_math, strict=True):
        if name == "lse":  # the same -inf entries (empty rows), then the finite ones by the rule
            g = g.cpu()  # the kernel's lse may be on the GPU; the references are on the CPU
            assert torch.equal(torch.isinf(g), torch.isinf(e))
            g, e, s = (torch.where(torch.isinf(x), 0.0, x.double()) for x in (g, e, s))
        assert_close_to_reference(g, e, s, name=name)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case", [(5, 11, 4, 1, 80, 64, 7), (3, 9, 8, 2, 576, 512, 6)], ids=str)
def test_mla_views_of_one_tensor(backend, case):
    """k = kv and v = kv[..., :Dv] (FlashMLA's layout; 576/512 included): strided views, no copy needed."""
    k, v = make_inputs(case, torch.float32, "cpu", seed=5, mla_views=True)[1:3]
    assert v.data_ptr() == k.data_ptr() and not v.is_contiguous()
    assert_matches_reference(backend, case, torch.float32, seed=5, atol=2e-5, rtol=1e-5, mla_views=True)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case", [(6, 13, 6, 2, 16, 24, 9), (3, 8, 40, 2, 16, 16, 5)], ids=str)
def test_float64_in_float64_out(backend, case):
    assert_matches_reference(backend, case, torch.float64, seed=7, atol=1e-12, rtol=1e-10)


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="emulates on CPU tensors what a GPU launch does to float arguments")
@pytest.mark.parametrize("case", [(6, 13, 6, 2, 16, 24, 9), (5, 11, 4, 1, 80, 64, 7)], ids=str)
def test_float64_exact_when_float_arguments_arrive_as_float32(monkeypatch, case):
    """On a GPU the kernels' float arguments (qk_scale, sm_scale) are float32: float64 inputs must still
    get their scales exactly (a float32 qk_scale put errors of ~2e-8 on out, 1e-10 is the bar)."""
    from musetalk_fast.kernels import sparse_attention as sa

    for name in ("sparse_attention_fwd_kernel", "sparse_attention_bwd_kernel"):
        monkeypatch.setattr(sa, name, float_arguments_as_on_a_gpu(getattr(sa, name)))
    assert_matches_reference("triton-interpreter", case, torch.float64, seed=7, atol=1e-12, rtol=1e-10)


@pytest.mark.skipif(not kernel_backends()[1:], reason="no Triton backend here")
@pytest.mark.parametrize("keys_as_m", [False, True])
@pytest.mark.parametrize("case", [EDGE_CASES[2], EDGE_CASES[5], CASES[-1]], ids=str)
def test_triton_forward_in_both_orientations(monkeypatch, keys_as_m, case):
    """The forward's two matmul orientations (heads as M, or the transposed product with keys as M, the
    heuristic's choice for small groups on a GPU) both match the reference, whatever config runs here."""
    from musetalk_fast.kernels import sparse_attention as sa

    monkeypatch.setattr(sa.FWD, "_resolve", lambda run, device, match, sizes: dict(
        BLOCK_K=16, num_warps=4, num_stages=1, KEYS_AS_M=keys_as_m))
    monkeypatch.setattr(sa.FWD, "_chosen", {})
    q, k, v, indices = make_inputs(case, torch.float32, backend_device(kernel_backends()[1]), seed=22)
    out, lse = sa.sparse_attention_forward(q, k, v, indices)
    ref_out, ref_lse = reference.sparse_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), indices.cpu())
    assert_close_to_reference(out, ref_out, name="out", atol=2e-5, rtol=1e-5)
    assert_close_to_reference(lse, ref_lse, name="lse", atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
def test_any_index_value_is_read_safely(backend):
    """Every int32 outside [0, S) (the extremes, S itself, -1) is "no key": masked out of the gather,
    never dereferenced (on the GPU, compute-sanitizer memcheck is the stronger check), skipped in
    the softmax and the gradients."""
    case = (4, 9, 4, 2, 16, 8, 6)
    q, k, v, indices = make_inputs(case, torch.float32, backend_device(backend), seed=23)
    extremes = torch.tensor([-2**31, 2**31 - 1, 9, -1, 10**9, -(10**9)], dtype=torch.int32)
    indices[0, 0] = extremes.to(indices.device)
    indices[1, 1, ::2] = extremes[:3].to(indices.device)
    grad_out, grad_lse = upstream_grads(q, v, torch.float32, seed=24)
    got = run_kernel(backend, q, k, v, indices, grad_out, grad_lse)
    exact = reference_outputs(q, k, v, indices, grad_out, grad_lse)
    for name, g, e in zip(NAMES, got, exact, strict=True):
        assert_close_to_reference(g, e, name=name, atol=2e-5, rtol=1e-5)
    assert torch.isneginf(got[1][0, :2]).all()


def test_empty_rows_give_zero_and_minus_inf_and_no_nan():
    q, k, v, indices = make_inputs((4, 10, 4, 2, 16, 16, 5), torch.float32, "cpu", seed=9)
    indices[1] = -1
    indices[2, 0] = 10  # == S: out of range
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, lse = musetalk_fast.ops.sparse_attention(*leaves, indices)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    assert torch.isneginf(lse[2, :2]).all() and torch.isfinite(lse[2, 2:]).all()
    grads = torch.autograd.grad(out.square().sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))


@pytest.mark.skipif(not kernel_backends()[1:], reason="no Triton backend here")
def test_triton_deterministic_dkdv_matches_atomics():
    """The deterministic segment sum (torch.are_deterministic_algorithms_enabled()) and the atomics give
    the same dk, dv; the deterministic one is bitwise reproducible."""
    backend = kernel_backends()[1]
    device = backend_device(backend)
    q, k, v, indices = make_inputs((9, 7, 8, 2, 16, 24, 6), torch.float32, device, seed=10)
    grad_out, grad_lse = upstream_grads(q, v, torch.float32, seed=11)
    from musetalk_fast.kernels.sparse_attention import sparse_attention_backward, sparse_attention_forward

    out, lse = sparse_attention_forward(q, k, v, indices)
    grad_lse = torch.where(torch.isinf(lse), 0.0, grad_lse)
    args = (grad_out, grad_lse, q, k, v, indices, out, lse)
    atomics = sparse_attention_backward(*args, deterministic=False)
    first = sparse_attention_backward(*args, deterministic=True)
    second = sparse_attention_backward(*args, deterministic=True)
    for a, b, c in zip(atomics, first, second, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert torch.equal(b, c)


def test_cpu_backward_is_deterministic_whatever_the_thread_count():
    q, k, v, indices = make_inputs((70, 5, 4, 1, 16, 16, 4), torch.float32, "cpu", seed=12)  # > 1 token block
    grad_out, grad_lse = upstream_grads(q, v, torch.float32, seed=13)
    threads = torch.get_num_threads()
    results = []
    for n in (1, max(threads, 2)):
        torch.set_num_threads(n)
        results.append(run_kernel("cpu", q, k, v, indices, grad_out, grad_lse))
    torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    """Through out and the finite entries of lse (rows 0 and 3 are empty: lse -inf, no gradient)."""
    q, k, v, indices = make_inputs((4, 6, 4, 2, 8, 6, 4), torch.float64, device, seed=14)
    indices[3] = -1
    weights = torch.randn(4, 4, dtype=torch.float64, generator=seeded(15)).to(device)

    def fn(q, k, v):
        out, lse = musetalk_fast.ops.sparse_attention(q, k, v, indices, 0.7)
        return out, torch.where(torch.isinf(lse), 0.0, lse) * weights

    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (q, k, v)])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q, k, v, indices = make_inputs((5, 9, 4, 2, 16, 8, 6), torch.float32, device, seed=16)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.musetalk_fast.sparse_attention.default, (*leaves, indices, None))
    out, lse = torch.ops.musetalk_fast.sparse_attention(q.detach(), k.detach(), v.detach(), indices, 0.5)
    grad_out, grad_lse = upstream_grads(q, v, torch.float32, seed=17)
    args = (grad_out, grad_lse, q.detach(), k.detach(), v.detach(), indices, out, lse, 0.5)
    torch.library.opcheck(torch.ops.musetalk_fast.sparse_attention_backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    inputs = make_inputs((6, 10, 4, 1, 16, 16, 5), torch.float32, device, seed=18)

    def loss_fn(q, k, v, indices):
        out, lse = musetalk_fast.ops.sparse_attention(q, k, v, indices)
        return out.square().sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in inputs[:3]]
    grads = torch.autograd.grad(compiled(*leaves, inputs[3]), leaves)
    eager = [t.clone().requires_grad_() for t in inputs[:3]]
    expected = torch.autograd.grad(loss_fn(*eager, inputs[3]), eager)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e)


T, S, D = 4, 6, 16


def _good(**changes):
    gen = seeded(19)
    args = dict(q=torch.randn(T, 4, D, generator=gen), k=torch.randn(S, 2, D, generator=gen),
                v=torch.randn(S, 2, 8, generator=gen),
                indices=torch.randint(-2, S + 2, (T, 2, 3), generator=gen, dtype=torch.int32))
    return {**args, **changes}


def _bad(error, message, **changes):
    return pytest.param(_good(**changes), error, message, id=message[:40])


# Each kind of bad input with its whole message: the C++ checks (CPU tensors) and the Python checks
# (CUDA tensors, fake tensors under torch.compile) say exactly this.
BAD_INPUTS = [
    _bad(TypeError, f"q must be {FLOATS}, got int64", q=torch.randint(0, 3, (T, 4, D))),
    _bad(TypeError, f"q must be {FLOATS}, got float8_e4m3fn", q=torch.zeros(T, 4, D).to(torch.float8_e4m3fn)),
    _bad(TypeError, "k must have q's dtype float32, got float64", k=torch.randn(S, 2, D).double()),
    _bad(TypeError, "v must have q's dtype float32, got bfloat16", v=torch.randn(S, 2, 8).bfloat16()),
    _bad(TypeError, "indices must be int32, got int64", indices=torch.zeros(T, 2, 3).long()),
    _bad(ValueError, "q must have rank 3, got shape [4, 64]", q=torch.randn(T, 4 * D)),
    _bad(ValueError, "k must have rank 3, got shape [6, 32]", k=torch.randn(S, 2 * D)),
    _bad(ValueError, "k head dim 8 must equal q head dim 16", k=torch.randn(S, 2, 8)),
    _bad(ValueError, "q heads (4) must be a multiple of k/v heads (3)", k=torch.randn(S, 3, D), v=torch.randn(S, 3, 8)),
    _bad(ValueError, "q heads (4) must be a multiple of k/v heads (0)", k=torch.randn(S, 0, D), v=torch.randn(S, 0, 8)),
    _bad(ValueError, "v must have shape [S, Hkv, Dv] = [6, 2, Dv], got [7, 2, 8]", v=torch.randn(7, 2, 8)),
    _bad(ValueError, "v must have shape [S, Hkv, Dv] = [6, 2, Dv], got [6, 1, 8]", v=torch.randn(S, 1, 8)),
    _bad(ValueError, "v must have shape [S, Hkv, Dv] = [6, 2, Dv], got [6, 16]", v=torch.randn(S, 16)),
    _bad(ValueError, "indices must have shape [T, Hkv, K] = [4, 2, K], got [4, 1, 3]",
         indices=torch.zeros(T, 1, 3, dtype=torch.int32)),
    _bad(ValueError, "indices must have shape [T, Hkv, K] = [4, 2, K], got [5, 2, 3]",
         indices=torch.zeros(5, 2, 3, dtype=torch.int32)),
    _bad(ValueError, "indices must have shape [T, Hkv, K] = [4, 2, K], got [4, 6]",
         indices=torch.zeros(T, 6, dtype=torch.int32)),
]


@pytest.mark.parametrize("device", DEVICES + ["fake"])
@pytest.mark.parametrize("tensors,error,message", BAD_INPUTS)
def test_bad_input_raises_the_whole_message(device, tensors, error, message):
    """On every device, and on the fake tensors torch.compile traces with: the same full message."""
    if device == "fake":
        with pytest.raises(error) as raised, torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            musetalk_fast.ops.sparse_attention(**{n: mode.from_tensor(t) for n, t in tensors.items()})
    else:
        with pytest.raises(error) as raised:
            musetalk_fast.ops.sparse_attention(**{n: t.to(device) for n, t in tensors.items()})
    assert str(raised.value).splitlines()[0] == message


@pytest.mark.parametrize("name", ["v", "indices"])
def test_tensor_on_another_device_is_named(name):
    """A tensor on another device (meta here; CUDA vs CPU on a GPU machine) is named, not dereferenced."""
    tensors = _good()
    tensors[name] = tensors[name].to("meta")
    with pytest.raises(ValueError, match=f"^{name} must be on q's device cpu, got meta$"):
        musetalk_fast.ops.sparse_attention(**tensors)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_deterministic_mode_is_bitwise_reproducible():
    q, k, v, indices = make_inputs((64, 40, 16, 2, 64, 64, 24), torch.bfloat16, "cuda", seed=20)
    grad_out, grad_lse = upstream_grads(q, v, torch.float32, seed=21)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = run_kernel("cuda", q, k, v, indices, grad_out, grad_lse)
        second = run_kernel("cuda", q, k, v, indices, grad_out, grad_lse)
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


SM90_CHECK = """
from musetalk_fast.bench import hopper_compile as h
for label, fn, pointers, constexprs, warps, stages, divisible in h._sparse_attention_specs(quick=True):
    usage = h.compile_sm90(fn, pointers, constexprs, warps, stages, divisible)
    print(label, '|', usage['spill_bytes'], usage['stack_bytes'], usage['shared_bytes'], usage['wgmma'])
"""


def test_kernels_compile_for_sm90_without_spills_or_stack():
    """The forward and both backward modes at the benchmarks' keys (GQA group 16, MQA 64, bf16 D128)
    compile for the H100 with no spill (LOCAL) and no stack frame (where ptxas puts spilled registers),
    and their half-precision matmuls run on wgmma (the deterministic dk/dv segment sum has none)."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton ships no NVIDIA backend tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SM90_CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line.split(" | ") for line in result.stdout.splitlines()]
    assert len(rows) == 8, result.stdout
    for label, usage in rows:
        spill, stack, shared, wgmma = usage.split()
        assert spill == "0" and stack == "0" and int(shared) <= 227 * 1024, (label, usage)
        assert wgmma == "True" or "dkdv" in label or "bwd_det" in label and "G16" in label, (label, usage)

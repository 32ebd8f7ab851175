"""Under torch.autocast the kernels keep their own precision: float32 inputs give the same forward and
backward as without autocast (the CPU kernels' internal ATen matmuls must not be cast to bf16, which
also mixed dtypes in the backward: at::mm of bf16 and float raised)."""
import pytest
import torch

from musetalk_fast.ops import gated_attention, lightning_indexer, mhc_pre, sparse_attention


def _inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=generator, requires_grad=True)


def _gated_attention(randn):
    q, k, v, gate = randn(2, 3, 7, 16), randn(2, 3, 9, 16), randn(2, 3, 9, 16), randn(2, 3, 7, 16)
    return (q, k, v, gate), lambda: gated_attention(q, k, v, gate, is_causal=True)


def _mhc_pre(randn):
    n, channels = 4, 8
    x, phi = randn(5, n, channels), randn(n * channels, n * n + 2 * n)
    alpha, bias = randn(3), randn(n * n + 2 * n)
    return (x, phi, alpha, bias), lambda: torch.cat([t.flatten() for t in mhc_pre(x, phi, alpha, bias)])


def _lightning_indexer(randn):
    q, k, k_scale, weights = randn(6, 4, 32), randn(10, 32), randn(10), randn(6, 4)
    ks = torch.zeros(6, dtype=torch.int32)
    ke = torch.arange(5, 11, dtype=torch.int32)
    return (q, k, k_scale, weights), lambda: lightning_indexer(q, k, k_scale, weights, ks, ke).clamp_min(-1e4)


def _sparse_attention(randn):
    q, k, v = randn(5, 4, 16), randn(9, 2, 16), randn(9, 2, 16)
    indices = torch.stack([torch.randperm(9, generator=torch.Generator().manual_seed(t))[:6] for t in range(10)])
    indices = indices.view(5, 2, 6).to(torch.int32)
    return (q, k, v), lambda: sparse_attention(q, k, v, indices)[0]


@pytest.mark.parametrize("case", [_gated_attention, _mhc_pre, _lightning_indexer, _sparse_attention],
                         ids=lambda case: case.__name__.strip("_"))
def test_float32_under_autocast_matches_float32(case):
    inputs, run = case(_inputs(0))
    out = run()
    grads = torch.autograd.grad(out.sum(), inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_autocast = run()
        grads_autocast = torch.autograd.grad(out_autocast.sum(), inputs)  # the backward inside autocast too
    assert out_autocast.dtype == torch.float32
    torch.testing.assert_close(out_autocast, out, rtol=0, atol=0)
    for grad_autocast, grad in zip(grads_autocast, grads):
        torch.testing.assert_close(grad_autocast, grad, rtol=0, atol=0)

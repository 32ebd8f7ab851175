"""The reference-ops switch: under use_reference_ops every public op wrapper calls musetalk_fast.reference."""
import inspect

import pytest
import torch

import musetalk_fast.ops as ops
from musetalk_fast import reference
from musetalk_fast.nn import GatedAttention

# Every public op wrapper; engram_lookup_async routes through engram_lookup.
ROUTED = ["gated_attention", "gated_attention_varlen", "sinkhorn", "mhc_pre", "mhc_post", "lightning_indexer",
          "fp8_quantize", "topk_indices", "lightning_indexer_topk", "sparse_attention", "engram_hash",
          "engram_gather", "engram_lookup"]
NOT_OPS = {"set_gated_attention_deterministic", "use_reference_ops", "set_reference_ops", "reference_ops_enabled",
           "engram_lookup_async"}


def test_every_public_op_is_routed():
    assert set(ops.__all__) - NOT_OPS == set(ROUTED)


@pytest.mark.parametrize("name", ROUTED)
def test_wrapper_calls_the_reference_function_only_when_on(name, monkeypatch):
    """A stand-in reference function records its arguments: the wrapper hands them over unchanged."""
    calls = []
    monkeypatch.setattr(reference, name, lambda *args, **kwargs: calls.append((args, kwargs)) or "reference")
    with ops.use_reference_ops():
        assert ops.reference_ops_enabled()
        assert getattr(ops, name)("a", "b", key="c") == "reference"
    assert calls == [(("a", "b"), {"key": "c"})]
    assert not ops.reference_ops_enabled()



@pytest.mark.parametrize("name", ROUTED)
def test_wrapper_and_reference_share_the_signature(name):
    assert list(inspect.signature(getattr(ops, name)).parameters) == list(
        inspect.signature(getattr(reference, name)).parameters)


def test_async_lookup_routes_through_engram_lookup(monkeypatch):
    monkeypatch.setattr(reference, "engram_lookup", lambda *args, **kwargs: "reference")
    ids = torch.zeros(1, 3, dtype=torch.int64)
    with ops.use_reference_ops():
        assert ops.engram_lookup_async(ids, None, None, None, None).wait() == "reference"


def test_module_runs_on_reference_ops_with_the_same_weights(monkeypatch):
    """nn.GatedAttention under the switch: reference.gated_attention runs (counted), the kernel does not,
    and the outputs and gradients agree."""
    torch.manual_seed(0)
    module = GatedAttention(32, 4, head_dim=8)
    x = torch.randn(2, 6, 32, requires_grad=True)
    calls = []
    original = reference.gated_attention
    monkeypatch.setattr(reference, "gated_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    ours = module(x)
    assert not calls
    with ops.use_reference_ops():
        ref = module(x)
    assert len(calls) == 1
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    grad_ours, grad_ref = (torch.autograd.grad(out.square().sum(), x)[0] for out in (ours, ref))
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-5, rtol=1e-5)


def test_switch_restores_the_previous_setting():
    assert ops.set_reference_ops(True) is False
    try:
        with ops.use_reference_ops(False):
            assert not ops.reference_ops_enabled()
        assert ops.reference_ops_enabled()
        with pytest.raises(RuntimeError):
            with ops.use_reference_ops(False):
                raise RuntimeError("inside")
        assert ops.reference_ops_enabled()
    finally:
        ops.set_reference_ops(False)

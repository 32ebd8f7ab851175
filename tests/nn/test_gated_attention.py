"""musetalk_fast.nn.GatedAttention against the same block written with torch's SDPA."""
import pytest
import torch
import torch.nn.functional as F

from musetalk_fast.nn import GatedAttention


def unfused_block(module, x, is_causal, rope=None):
    """The same block with the gate as a separate elementwise pass after torch's SDPA."""
    B, L, _ = x.shape
    H, Hkv, D, gd = module.num_heads, module.num_kv_heads, module.head_dim, module.gate_dim
    q, gate = module.q_proj(x).view(B, L, H, D + gd).split([D, gd], -1)
    k, v = module.k_proj(x).view(B, L, Hkv, D), module.v_proj(x).view(B, L, Hkv, D)
    if rope is not None:
        q, k = rope(q, k, None)
    k, v = (t.transpose(1, 2).repeat_interleave(H // Hkv, 1) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=is_causal)
    out = out * torch.sigmoid(gate.transpose(1, 2))
    return module.o_proj(out.transpose(1, 2).reshape(B, L, H * D))


def toy_rope(q, k, position_ids):
    """A fixed rotation of channel pairs: enough to show the hook is applied to q and k."""
    def rotate(t):
        half = t.shape[-1] // 2
        return torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return rotate(q), rotate(k)


@pytest.mark.parametrize("heads,kv_heads,head_wise,is_causal,rope", [
    (4, 4, False, False, None), (4, 1, True, True, None), (8, 2, False, True, toy_rope)])
def test_module_matches_unfused_block(heads, kv_heads, head_wise, is_causal, rope):
    torch.manual_seed(0)
    module = GatedAttention(64, heads, kv_heads, head_dim=16, head_wise_gate=head_wise, is_causal=is_causal,
                            rope=rope).double()
    x = torch.randn(2, 11, 64, dtype=torch.float64, requires_grad=True)
    out = module(x)
    want = unfused_block(module, x, is_causal, rope)
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
    want_grads = torch.autograd.grad(want.square().sum(), [x, *module.parameters()])
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


def test_per_call_causal_override_and_bad_heads():
    module = GatedAttention(32, 2)
    x = torch.randn(1, 5, 32)
    assert not torch.allclose(module(x, is_causal=True), module(x, is_causal=False))
    with pytest.raises(ValueError, match="num_kv_heads"):
        GatedAttention(32, 4, 3)


@pytest.mark.parametrize("is_causal", [False, True])
def test_packed_clips_match_one_call_per_clip(is_causal):
    """cu_seqlens: clips of different lengths packed into one [T, hidden] call give each clip's own output."""
    torch.manual_seed(1)
    module = GatedAttention(32, 4, 2, head_dim=8, is_causal=is_causal).double()
    clips = [torch.randn(n, 32, dtype=torch.float64) for n in (5, 1, 9)]
    cu_seqlens = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    packed = module(torch.cat(clips), cu_seqlens=cu_seqlens)
    want = torch.cat([module(clip.unsqueeze(0))[0] for clip in clips])
    torch.testing.assert_close(packed, want)


def test_cross_attention_matches_unfused_block():
    """context: keys and values from another sequence of another width (e.g. audio tokens)."""
    torch.manual_seed(2)
    module = GatedAttention(32, 4, 2, head_dim=8, context_size=12).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    out = module(x, context=context)
    q, gate = module.q_proj(x).view(2, 7, 4, 16).split([8, 8], -1)
    k, v = (proj(context).view(2, 5, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
            for proj in (module.k_proj, module.v_proj))
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k, v) * torch.sigmoid(gate.transpose(1, 2))
    want = module.o_proj(want.transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(out, want)
    inputs = [x, context, *module.parameters()]
    for g, w in zip(torch.autograd.grad(out.square().sum(), inputs), torch.autograd.grad(want.square().sum(), inputs)):
        torch.testing.assert_close(g, w)
    with pytest.raises(ValueError, match="context_size = 12"):
        module(x, context=torch.randn(2, 5, 13, dtype=torch.float64))
    with pytest.raises(ValueError, match="context"):
        module(x, context=torch.randn(3, 5, 12, dtype=torch.float64))

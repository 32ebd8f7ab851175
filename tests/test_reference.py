"""The reference (the executable spec) against slow, literal loop versions of docs/ops.md, tiny sizes."""
import math

import torch

from musetalk_fast import reference
from tests.helpers import seeded as gen


def test_lightning_indexer_and_topk():
    T, S, H, D = 5, 7, 3, 4
    q, k = torch.randn(T, H, D, generator=gen(0)), torch.randn(S, D, generator=gen(1))
    k_scale, weights = torch.rand(S, generator=gen(2)) + 0.5, torch.randn(T, H, generator=gen(3))
    ks = torch.tensor([0, 0, 2, 1, 7], dtype=torch.int32)
    ke = torch.tensor([1, 7, 5, 1, 7], dtype=torch.int32)  # rows 3 and 4 see no key
    logits = reference.lightning_indexer(q, k, k_scale, weights, ks, ke)
    for t in range(T):
        for s in range(S):
            if ks[t] <= s < ke[t]:
                want = k_scale[s] * sum(weights[t, h] * max(float(q[t, h] @ k[s]), 0.0) for h in range(H))
                assert math.isclose(logits[t, s].item(), float(want), rel_tol=1e-5, abs_tol=1e-5)
            else:
                assert logits[t, s].item() == float("-inf")
    top = reference.topk_indices(logits, 3)
    for t in range(T):
        valid = sorted(((logits[t, s].item(), s) for s in range(S) if ks[t] <= s < ke[t]), reverse=True)[:3]
        want = [s for _, s in valid] + [-1] * (3 - len(valid))
        assert top[t].tolist() == want
    assert top.dtype == torch.int32
    fused = reference.lightning_indexer_topk(q, k, k_scale, weights, ks, ke, 3)
    assert torch.equal(fused, top)
    # ks/ke given to topk_indices restrict the range further
    narrowed = reference.topk_indices(logits, 2, ks=torch.full((T,), 3, dtype=torch.int32))
    for t in range(T):
        assert all(i == -1 or i >= 3 for i in narrowed[t].tolist())


def test_fp8_quantize_round_trip():
    x = torch.randn(4, 64, generator=gen(4)) * 3
    for block, ue8m0 in [(None, False), (32, False), (16, True)]:
        x_fp8, scale = reference.fp8_quantize(x, block, ue8m0)
        assert x_fp8.dtype == torch.float8_e4m3fn and x_fp8.shape == x.shape
        b = 64 if block is None else block
        assert scale.shape == ((4,) if block is None else (4, 64 // b))
        per_value = scale.reshape(4, -1).repeat_interleave(b, dim=1)
        back = x_fp8.float() * per_value
        assert (back - x).abs().max() <= 0.07 * x.abs().max()  # e4m3 has 3 mantissa bits
        assert (x_fp8.float().abs().amax(-1) <= 448).all()
        if ue8m0:
            assert torch.equal(torch.log2(scale), torch.round(torch.log2(scale)))


def test_sparse_attention():
    T, Hq, Hkv, D, Dv, S = 3, 4, 2, 8, 6, 5
    q, k, v = torch.randn(T, Hq, D, generator=gen(5)), torch.randn(S, Hkv, D, generator=gen(6)), torch.randn(
        S, Hkv, Dv, generator=gen(7))
    indices = torch.tensor([[[0, 4, -1, 2], [1, 1, 9, 3]], [[-1, -1, -1, -1], [0, 1, 2, 3]],
                            [[4, 3, 2, 1], [-5, 0, 5, 4]]], dtype=torch.int32)
    out, lse = reference.sparse_attention(q, k, v, indices, sm_scale=0.7)
    for t in range(T):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            keys = [int(i) for i in indices[t, g] if 0 <= i < S]
            if not keys:
                assert lse[t, h].item() == float("-inf") and out[t, h].abs().max() == 0
                continue
            scores = torch.stack([q[t, h] @ k[i, g] * 0.7 for i in keys])
            p = torch.softmax(scores, 0)
            torch.testing.assert_close(out[t, h], sum(p[j] * v[i, g] for j, i in enumerate(keys)))
            torch.testing.assert_close(lse[t, h], torch.logsumexp(scores, 0))


def test_gated_attention():
    B, Hq, Hkv, L, S, D = 1, 4, 2, 3, 5, 4
    q, k, v = torch.randn(B, Hq, L, D, generator=gen(8)), torch.randn(B, Hkv, S, D, generator=gen(9)), torch.randn(
        B, Hkv, S, D, generator=gen(10))
    gate = torch.randn(B, Hq, L, 1, generator=gen(11))
    for causal in (False, True):
        out = reference.gated_attention(q, k, v, gate, causal)
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(L):
                keys = range(min(i + 1, S)) if causal else range(S)
                p = torch.softmax(torch.stack([q[0, h, i] @ k[0, g, j] / math.sqrt(D) for j in keys]), 0)
                want = sum(p[n] * v[0, g, j] for n, j in enumerate(keys)) * torch.sigmoid(gate[0, h, i])
                torch.testing.assert_close(out[0, h, i], want)


def test_sinkhorn():
    logits = torch.randn(4, 4, generator=gen(12), dtype=torch.float64)
    p = torch.exp(logits - logits.max())
    for _ in range(3):
        for j in range(4):
            p[:, j] = p[:, j] / (p[:, j].sum() + 1e-6)
        for i in range(4):
            p[i, :] = p[i, :] / (p[i, :].sum() + 1e-6)
    torch.testing.assert_close(reference.sinkhorn(logits, 3, 1e-6), p)


def test_mhc_pre_and_post():
    N, n, C = 3, 2, 5
    x = torch.randn(N, n, C, generator=gen(13), dtype=torch.float64)
    phi = torch.randn(n * C, n * n + 2 * n, generator=gen(14), dtype=torch.float64)
    alpha, bias = torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64), torch.randn(n * n + 2 * n, generator=gen(15),
                                                                                 dtype=torch.float64)
    x_in, h_post, h_res = reference.mhc_pre(x, phi, alpha, bias, iters=4)
    for t in range(N):
        flat = x[t].reshape(-1)
        y = flat @ phi / math.sqrt(float(flat @ flat) / (n * C) + reference.MHC_RMS_EPS)
        h_pre = torch.sigmoid(alpha[0] * y[:n] + bias[:n])
        torch.testing.assert_close(h_post[t], 2 * torch.sigmoid(alpha[1] * y[n:2 * n] + bias[n:2 * n]))
        torch.testing.assert_close(h_res[t], reference.sinkhorn((alpha[2] * y[2 * n:] + bias[2 * n:]).view(n, n), 4))
        torch.testing.assert_close(x_in[t], sum(h_pre[i] * x[t, i] for i in range(n)))
    f_out = torch.randn(N, C, generator=gen(16), dtype=torch.float64)
    x_next = reference.mhc_post(x, f_out, h_post, h_res)
    for t in range(N):
        for i in range(n):
            want = sum(h_res[t, i, j] * x[t, j] for j in range(n)) + h_post[t, i] * f_out[t]
            torch.testing.assert_close(x_next[t, i], want)


def wrap64(v):
    """Python int -> int64 two's complement."""
    return (v + 2**63) % 2**64 - 2**63


def test_engram_hash_gather_lookup():
    B, L, pad_id = 2, 6, 3
    ids = torch.randint(0, 1000, (B, L), generator=gen(17))
    multipliers = torch.tensor([[2654435761, 0, 0], [40503, 97, 0], [(1 << 61) + 1, 7, 1 << 40 | 1]])
    moduli = torch.tensor([[11, 13], [17, 19], [23, 29]])
    offsets = torch.tensor([0, 11, 24, 41, 60, 83])
    rows = reference.engram_hash(ids, multipliers, moduli, offsets, pad_id)
    assert rows.shape == (B, L, 6) and rows.dtype == torch.int64
    for b in range(B):
        for t in range(L):
            for o in range(3):
                n_o = int((multipliers[o] != 0).sum())
                mix = wrap64(int(ids[b, t]) * int(multipliers[o, 0]))
                for j in range(1, n_o):
                    prev = int(ids[b, t - j]) if t - j >= 0 else pad_id
                    mix = wrap64(mix ^ wrap64(prev * int(multipliers[o, j])))
                for h in range(2):
                    assert rows[b, t, o * 2 + h].item() == int(offsets[o * 2 + h]) + mix % int(moduli[o, h])
    table = torch.randn(112, 4, generator=gen(18))
    emb = reference.engram_gather(table, rows)
    assert torch.equal(emb, table[rows])
    lookup = reference.engram_lookup(ids, table, multipliers, moduli, offsets, pad_id)
    assert torch.equal(lookup, table[rows].flatten(-2))
    table.requires_grad_()
    grad = torch.autograd.grad(reference.engram_gather(table, rows, sparse=True).sum(), table)[0]
    assert grad.is_sparse
    torch.testing.assert_close(grad.to_dense(), torch.bincount(rows.flatten(), minlength=112)[:, None].float()
                               .expand(112, 4))

"""musetalk_fast.nn.DSAttention: with top-k >= the visible keys it is dense causal attention (packed
tokens, batched sequences, the temporal frame axis, the dense warm-up); the sparse stage reads only the
indexer's top-k; the indexer KL loss trains the indexer alone; a small CPU training run in which the
model's loss and the indexer KL loss both fall."""
import pytest
import torch
import torch.nn.functional as F

from musetalk_fast.nn import DSAttention
from musetalk_fast.nn.sparse_attention import all_visible_indices, sequence_ranges


def make_module(seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, topk=6, index_heads=2, index_head_dim=32)
    return DSAttention(**{**args, **kwargs})


def dense_attention(module, x, causal=True):
    """x [B, L, hidden] through the module's projections and SDPA (causal, GQA)."""
    batch, length, _ = x.shape

    def heads(proj, n):
        return proj(x).view(batch, length, n, module.head_dim).transpose(1, 2)

    q, k, v = heads(module.q_proj, module.num_heads), heads(module.k_proj, module.num_kv_heads), heads(
        module.v_proj, module.num_kv_heads)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    return module.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


@pytest.mark.parametrize("causal", [True, False])
def test_topk_covering_every_key_is_dense_attention(causal):
    module = make_module(topk=64, causal=causal).eval()
    x = torch.randn(2, 11, 32)
    torch.testing.assert_close(module(x), dense_attention(module, x, causal), atol=1e-5, rtol=1e-5)
    # Packed tokens with ks/ke: the same two sequences.
    ks, ke = sequence_ranges(2, 11, causal, x.device)
    torch.testing.assert_close(module(x.reshape(22, 32), ks, ke).view(2, 11, 32), module(x), atol=1e-6, rtol=1e-6)


def test_dense_warmup_is_dense_attention_whatever_topk():
    module = make_module(topk=2, dense_warmup=True).eval()
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(module(x), dense_attention(module, x), atol=1e-5, rtol=1e-5)


def test_temporal_attention_runs_over_the_frames_of_each_position():
    module = make_module(topk=64, temporal=True).eval()
    x = torch.randn(2, 5, 3, 32)  # [B, F, N, C]
    per_position = dense_attention(module, x.transpose(1, 2).reshape(6, 5, 32)).view(2, 3, 5, 32).transpose(1, 2)
    torch.testing.assert_close(module(x), per_position, atol=1e-5, rtol=1e-5)


def test_sparse_stage_attends_only_the_indexer_topk():
    """Each query reads min(topk, visible) keys chosen by the indexer: the output matches dense attention
    restricted to those keys."""
    module = make_module(topk=3).eval()
    x = torch.randn(1, 10, 32)
    ks, ke = sequence_ranges(1, 10, True, x.device)
    tokens = x[0]
    indices = module.indexer.topk(tokens, ks, ke, 3)
    assert ((indices >= 0).sum(1) == torch.clamp(ke - ks, max=3)).all()
    q = module.q_proj(tokens).view(10, 4, 8)
    k, v = module.k_proj(tokens).view(10, 2, 8), module.v_proj(tokens).view(10, 2, 8)
    allowed = torch.zeros(10, 10, dtype=torch.bool)
    for t, key in (indices >= 0).nonzero().tolist():
        allowed[t, indices[t, key]] = True
    scores = torch.einsum("thd,shd->hts", q, k.repeat_interleave(2, 1)) * 8**-0.5
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    want = module.o_proj(torch.einsum("hts,shd->thd", probs, v.repeat_interleave(2, 1)).reshape(10, 32))
    torch.testing.assert_close(module(x)[0], want, atol=1e-5, rtol=1e-5)


def test_all_visible_indices_lists_the_range():
    ks, ke = torch.tensor([0, 0, 3], dtype=torch.int32), torch.tensor([1, 3, 5], dtype=torch.int32)
    assert all_visible_indices(ks, ke).tolist() == [[0, -1, -1], [0, 1, 2], [3, 4, -1]]
    assert all_visible_indices(ks, ke, width=3).tolist() == [[0, -1, -1], [0, 1, 2], [3, 4, -1]]  # no device read


@pytest.mark.parametrize("dense_warmup", [True, False])
def test_indexer_loss_trains_the_indexer_only(dense_warmup):
    module = make_module(dense_warmup=dense_warmup).train()
    out = module(torch.randn(2, 12, 32))
    assert module.indexer_loss is not None and torch.isfinite(module.indexer_loss)
    module.indexer_loss.backward()
    indexer = {id(p) for p in module.indexer.parameters()}
    for name, p in module.named_parameters():
        if id(p) in indexer:
            assert name.startswith("indexer.")
        else:
            assert p.grad is None, name  # the main attention is detached from the KL loss
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.indexer.parameters())
    module.eval()
    module(torch.randn(1, 4, 32))
    assert module.indexer_loss is None
    assert out.shape == (2, 12, 32)


def train(module, x, target, steps, frozen=()):
    """Adam steps on the MSE to target plus the indexer KL loss; parameters under `frozen` prefixes fixed.
    Returns the (loss, KL) of every step."""
    for name, p in module.named_parameters():
        p.requires_grad_(not name.startswith(tuple(frozen)))
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    history = []
    for _ in range(steps):
        loss = F.mse_loss(module(x), target)
        kl = module.indexer_loss
        optimizer.zero_grad()
        (loss + kl if loss.requires_grad else kl).backward()
        optimizer.step()
        history.append((loss.item(), kl.item()))
    return history


def falls(values, factor):
    return sum(values[-5:]) / 5 < factor * sum(values[:5]) / 5


def test_small_training_run_lowers_the_loss_and_the_indexer_kl():
    """DeepSeek-V3.2's two stages on a fixed random teacher. Dense warm-up with the main attention frozen:
    the indexer's KL over every visible key falls. Sparse stage (top-4 of up to 16 keys), q and k
    projections frozen so the attention pattern the indexer imitates holds still (with them training, it
    sharpens as the model fits and the KL target moves): the model's loss and the indexer KL both fall."""
    teacher = make_module(seed=7, topk=64).eval()
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = teacher(x)
    student = make_module(seed=8, topk=4, dense_warmup=True).train()
    warmup = train(student, x, target, 30, frozen=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert falls([kl for _, kl in warmup], 0.3), warmup
    student = make_module(seed=8, topk=4).train()
    sparse = train(student, x, target, 40, frozen=("q_proj", "k_proj"))
    assert falls([loss for loss, _ in sparse], 0.3), sparse
    assert falls([kl for _, kl in sparse], 0.5), sparse


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"^num_heads \(4\) must be a multiple of num_kv_heads \(3\)$"):
        DSAttention(32, 4, 3)
    with pytest.raises(ValueError, match=r"^topk must be >= 1, got 0$"):
        DSAttention(32, 4, topk=0)
    with pytest.raises(ValueError, match=r"temporal DSAttention takes x \[B, F, N, hidden\]"):
        make_module(temporal=True)(torch.randn(2, 5, 32))

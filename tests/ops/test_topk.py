"""topk_indices and lightning_indexer_topk: CPU C++ kernels and Triton kernels return a correct top-k set
(the same sorted values as torch.topk's, valid distinct in-range indices, -1 padding), sorted=True
orders by value, fused and unfused agree; opcheck, torch.compile, bad input."""
import pytest
import torch

import musetalk_fast
from musetalk_fast import reference
from musetalk_fast.ops.library import has_cuda_kernel
from tests.helpers import DEVICES, HAS_CUDA, TRITON_INTERPRETED, backend_device, kernel_backends, seeded
from tests.ops.test_lightning_indexer import (assert_whole_message, key_ranges, make_inputs, skip_extra_gpu_compile,
                                             use_shipped_configs)

FLOATS = "float16, bfloat16, float32 or float64"


def assert_valid_topk(indices, logits, k, ks=None, ke=None, name="indices", atol=0.0):
    """A correct top-k set, ties allowed: per row the values at the indices, sorted, equal the reference's
    (torch.topk of the finite logits in [ks, ke)), or are within atol of them (a kernel that computed the
    logits itself, with errors up to atol / 2: it may swap near-equal values at the k-th place); indices
    distinct and in range; -1 padding at the end."""
    indices, logits = indices.cpu(), logits.cpu()
    want = reference.topk_indices(logits, k, None if ks is None else ks.cpu(), None if ke is None else ke.cpu())
    assert indices.dtype == torch.int32 and indices.shape == want.shape, f"{name}: {indices.shape} != {want.shape}"
    num_rows, num_keys = logits.shape
    lo = torch.zeros(num_rows, dtype=torch.long) if ks is None else ks.cpu().long()
    hi = torch.full((num_rows,), num_keys, dtype=torch.long) if ke is None else ke.cpu().long()
    for row in range(num_rows):
        got_row, want_row = indices[row], want[row]
        found = int((got_row >= 0).sum())
        assert found == int((want_row >= 0).sum()), f"{name}: row {row} has {found} indices, want the reference's"
        assert (got_row[found:] == -1).all(), f"{name}: row {row}: -1 padding must follow the indices"
        chosen = got_row[:found].long()
        assert len(set(chosen.tolist())) == found, f"{name}: row {row} repeats an index"
        assert ((chosen >= lo[row]) & (chosen < hi[row])).all(), f"{name}: row {row} has an index outside [ks, ke)"
        values = logits[row].double()[chosen]
        assert torch.isfinite(values).all(), f"{name}: row {row} picked a non-finite logit"
        want_values = logits[row].double()[want_row[:found].long()]
        got_sorted, want_sorted = values.sort(descending=True).values, want_values.sort(descending=True).values
        if atol:
            assert ((got_sorted - want_sorted).abs() <= atol).all(), \
                f"{name}: row {row} is not a top-{k} set (to {atol:.3g})"
        else:
            assert torch.equal(got_sorted, want_sorted), f"{name}: row {row} is not a top-{k} set"


def indexer_allowance(args, logits):
    """assert_valid_topk's atol for a top-k of the indexer's logits computed by a kernel on inputs `args`:
    0 (exact sets) off the GPU. On a GPU, fp8 q . k runs on tensor cores whose accumulator keeps 13 mantissa
    bits (test_lightning_indexer.FP8_TENSOR_CORE_RTOL): logits off by ~1e-4 of the largest, enough to swap
    near-equal ones at the k-th place. There: 4x the measured error of our GPU indexer against the reference
    `logits` (the fused kernel does the same products; the factor covers a different rounding of the same
    size, and a top-k set of values within e is within 2e), plus float32 rounding."""
    if not args[0].is_cuda:
        return 0.0
    exact = logits.double().cpu()
    finite = torch.isfinite(exact)
    if not finite.any():
        return 0.0
    ours = musetalk_fast.ops.lightning_indexer(*args).double().cpu()
    return 4 * (ours[finite] - exact[finite]).abs().max().item() + 1e-5 * exact[finite].abs().max().item()


def run_topk(backend, logits, k, ks=None, ke=None, sorted=False):
    if backend == "triton-interpreter":
        from musetalk_fast.kernels.topk import topk_indices

        return topk_indices(logits, k, ks, ke, sorted)
    return musetalk_fast.ops.topk_indices(logits, k, ks, ke, sorted)


def run_fused(backend, *args):
    if backend == "triton-interpreter":
        from musetalk_fast.kernels.topk import lightning_indexer_topk

        return lightning_indexer_topk(*args)
    return musetalk_fast.ops.lightning_indexer_topk(*args)


def make_logits(num_rows, num_keys, dtype, seed):
    """Random logits with ties (a repeated column, quantised values), and +inf, -inf and NaN to skip."""
    logits = torch.randn(num_rows, num_keys, generator=seeded(seed), dtype=torch.float64)
    logits = (logits * 4).round() / 4 if seed % 2 else logits  # many ties
    if num_keys > 8 and num_rows > 1:
        logits[:, 7] = logits[:, 8]
        logits[0, 3], logits[1, 5], logits[-1, 2] = float("inf"), float("nan"), float("-inf")
    return logits.to(dtype)


TOPK_CASES = [(5, 37, 4, "ragged"), (3, 100, 7, "none"), (2, 10, 12, "none"), (4, 70, 0, "ragged"),
              (6, 40, 40, "causal"), (0, 5, 3, "none"), (3, 0, 2, "none"), (4, 300, 33, "ragged"), (3, 9, 5, "empty")]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("case", TOPK_CASES, ids=[f"T{c[0]}-S{c[1]}-k{c[2]}-{c[3]}" for c in TOPK_CASES])
def test_topk_indices_is_a_correct_topk(backend, dtype, case):
    num_rows, num_keys, k, kind = case
    device = backend_device(backend)
    logits = make_logits(num_rows, num_keys, dtype, seed=num_keys + k).to(device)
    ks, ke = (None, None) if kind == "none" else [t.to(device) for t in key_ranges(kind, num_rows, num_keys, k)]
    for sorted_ in (False, True):
        indices = run_topk(backend, logits, k, ks, ke, sorted_)
        assert_valid_topk(indices, logits, k, ks, ke, name=f"sorted={sorted_}")
        if sorted_ and num_keys:  # by value, descending
            values = torch.where(indices >= 0, logits.double().gather(1, indices.clamp_min(0).long()), float("-inf"))
            assert (values[:, :-1] >= values[:, 1:]).all()


@pytest.mark.parametrize("backend", kernel_backends())
def test_topk_indices_only_ks_or_only_ke(backend):
    device = backend_device(backend)
    logits = make_logits(4, 30, torch.float32, seed=2).to(device)
    bound = torch.tensor([0, 5, 29, 30], dtype=torch.int32, device=device)
    assert_valid_topk(run_topk(backend, logits, 6, bound, None), logits, 6, bound, None, "ks only")
    assert_valid_topk(run_topk(backend, logits, 6, None, bound), logits, 6, None, bound, "ke only")


# (T, S, H, D, key ranges, topk): each query's candidate buffer is compacted (several times) when it sees
# well over topk + BLOCK_S keys (BLOCK_S = 16 in the interpreter), as in the "full" cases.
FUSED_CASES = [(3, 150, 2, 32, "full", 5), (20, 70, 4, 64, "full", 1), (5, 37, 3, 32, "ragged", 4),
               (9, 90, 1, 64, "causal", 3), (4, 50, 16, 32, "packed", 17),
               (6, 120, 2, 128, "causal", 2), (3, 20, 4, 32, "empty", 3), (0, 5, 2, 32, "causal", 2),
               (4, 12, 2, 32, "ragged", 20), (3, 9, 2, 32, "ragged", 0)]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float32, torch.float64])
@pytest.mark.parametrize("case", FUSED_CASES,
                         ids=[f"T{c[0]}-S{c[1]}-H{c[2]}-D{c[3]}-{c[4]}-k{c[5]}" for c in FUSED_CASES])
def test_fused_matches_unfused(backend, dtype, case):
    """lightning_indexer_topk returns a top-k set of the indexer's logits (the reference's, ties allowed),
    which is what the unfused topk_indices(lightning_indexer(...)) returns."""
    *shape, topk = case
    skip_extra_gpu_compile(backend, dtype, case in FUSED_CASES[:2])
    args = make_inputs(tuple(shape), dtype, seed=topk + shape[1], device=backend_device(backend))
    fused = run_fused(backend, *args, topk)
    logits = reference.lightning_indexer(*[t.cpu() for t in args])
    atol = indexer_allowance(args, logits)
    assert_valid_topk(fused, logits, topk, name="fused", atol=atol)
    unfused = musetalk_fast.ops.topk_indices(musetalk_fast.ops.lightning_indexer(*args), topk)
    assert_valid_topk(unfused, logits, topk, name="unfused", atol=atol)



@pytest.mark.skipif(not TRITON_INTERPRETED, reason="runs the Triton kernels on CPU tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", [(5, 300, 3, 32, "ragged", 9), (2, 200, 64, 32, "full", 20)], ids=["H3", "H64"])
def test_fused_shipped_exact_configs(monkeypatch, dtype, case):
    """float32 and float64 with their shipped configs (32 and 64 rows, compaction chunks of 256), over
    enough keys that each query's buffer is compacted on the way: a top-k set of the reference's logits."""
    from musetalk_fast.kernels import topk as tk

    use_shipped_configs(monkeypatch, tk.FUSED)
    *shape, k = case
    config = tk.FUSED.heuristic_config(dict(tk._match(torch.empty(1, shape[2], shape[3], dtype=dtype), shape[2]),
                                            k=tk.triton.next_power_of_2(k)))
    assert config["CHUNK"] == 256 and shape[1] > tk.triton.next_power_of_2(k + config["BLOCK_S"])  # compacts
    args = make_inputs(tuple(shape), dtype, seed=k + shape[1], device="cpu")
    assert_valid_topk(tk.lightning_indexer_topk(*args, k), reference.lightning_indexer(*args), k, name="fused")

@pytest.mark.skipif(not HAS_CUDA, reason="GPU memory accounting")
def test_fused_needs_no_logits_matrix():
    """O(T * topk) extra memory: far below the [T, S] float32 logits the unfused path writes."""
    num_tokens, num_keys, topk = 4096, 16384, 256
    args = make_inputs((num_tokens, num_keys, 8, 64, "causal"), torch.float8_e4m3fn, 1, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    musetalk_fast.ops.lightning_indexer_topk(*args, topk)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < num_tokens * num_keys * 4 / 4


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits = make_logits(4, 20, torch.float32, seed=3).to(device)
    ks, ke = [t.to(device) for t in key_ranges("ragged", 4, 20, 1)]
    # Index outputs of a set whose order is unspecified: opcheck compares eager with eager, so it holds.
    torch.library.opcheck(torch.ops.musetalk_fast.topk_indices.default, (logits, 5, ks, ke, True))
    torch.library.opcheck(torch.ops.musetalk_fast.topk_indices.default, (logits, 5, None, None, False))
    args = make_inputs((4, 20, 2, 32, "causal"), torch.float32, 4, device)
    torch.library.opcheck(torch.ops.musetalk_fast.lightning_indexer_topk.default, (*args, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    args = make_inputs((6, 30, 2, 32, "causal"), torch.float32, 5, device)

    def select(q, k, k_scale, weights, ks, ke):
        logits = musetalk_fast.ops.lightning_indexer(q, k, k_scale, weights, ks, ke)
        return (musetalk_fast.ops.topk_indices(logits, 4, ks, ke, sorted=True),
                musetalk_fast.ops.lightning_indexer_topk(q, k, k_scale, weights, ks, ke, 4))

    compiled = torch.compile(select, fullgraph=True)
    sorted_indices, fused = compiled(*args)
    logits = reference.lightning_indexer(*[t.cpu() for t in args])
    assert_valid_topk(sorted_indices, logits, 4, name="compiled topk_indices")
    assert_valid_topk(fused, logits, 4, name="compiled fused")


T, S = 4, 6
BAD_INPUTS = [
    (dict(logits=torch.zeros(T, S, dtype=torch.int64), k=3), TypeError, f"logits must be {FLOATS}, got int64"),
    (dict(logits=torch.randn(1, T, S), k=3), ValueError, "logits must have rank 2, got shape [1, 4, 6]"),
    (dict(logits=torch.randn(T, S), k=-1), ValueError, "k must be >= 0, got -1"),
    (dict(logits=torch.randn(T, S), k=3, ks=torch.zeros(T, dtype=torch.int64)), TypeError,
     "ks must be int32, got int64"),
    (dict(logits=torch.randn(T, S), k=3, ke=torch.ones(5, dtype=torch.int32)), ValueError,
     "ke must have shape [T] = [4], got [5]"),
    (dict(logits=torch.randn(T, S), k=3, ks=torch.zeros(T, dtype=torch.int32, device="meta")), ValueError,
     "ks must be on logits' device cpu, got meta"),
    (dict(logits=torch.randn(T, S), k=3, ke=torch.tensor([1, 2, 9, 4], dtype=torch.int32)), ValueError,
     "ke must be <= S = 6, got ke[2] = 9"),
    (dict(logits=torch.randn(T, S), k=3, ks=torch.tensor([0, 3, 0, 0], dtype=torch.int32),
          ke=torch.tensor([1, 2, 3, 4], dtype=torch.int32)), ValueError, "ks must be <= ke, got ks[1] = 3 > ke[1] = 2"),
    (dict(logits=torch.randn(T, S), k=3, ks=torch.tensor([0, 0, 7, 0], dtype=torch.int32)), ValueError,
     "ks must be <= ke, got ks[2] = 7 > ke[2] = 6"),
]


def fused_args(**changes):
    args = dict(q=torch.randn(T, 2, 32), k=torch.randn(S, 32), k_scale=torch.rand(S) + 0.1, weights=torch.randn(T, 2),
                ks=torch.zeros(T, dtype=torch.int32), ke=torch.arange(1, T + 1, dtype=torch.int32), topk=3)
    return {**args, **changes}


BAD_INPUTS += [
    (fused_args(topk=-2), ValueError, "topk must be >= 0, got -2"),
    (fused_args(k=torch.randn(S, 64)), ValueError, "k head dim 64 must equal q head dim 32"),
    (fused_args(ks=torch.zeros(T, dtype=torch.int64)), TypeError, "ks must be int32, got int64"),
    (fused_args(k_scale=torch.rand(S, device="meta")), ValueError, "k_scale must be on q's device cpu, got meta"),
    (fused_args(k_scale=torch.rand(S + 1)), ValueError, "k_scale must have shape [S] = [6], got [7]"),
    (fused_args(ke=torch.tensor([1, 2, 3, 7], dtype=torch.int32)), ValueError, "ke must be <= S = 6, got ke[3] = 7"),
    (fused_args(q=torch.randn(T, 200, 32), weights=torch.randn(T, 200)), ValueError,
     "q heads must be between 1 and 128, got 200"),
]
def call(args, convert):
    args = {name: convert(t) if isinstance(t, torch.Tensor) else t for name, t in args.items()}
    if "logits" in args:
        return musetalk_fast.ops.topk_indices(**args)
    return musetalk_fast.ops.lightning_indexer_topk(**args)


@pytest.mark.parametrize("device", DEVICES + ["fake"])
@pytest.mark.parametrize("args,error,message", BAD_INPUTS, ids=[b[2][:40] for b in BAD_INPUTS])
def test_bad_input_raises_the_whole_message(device, args, error, message):
    assert_whole_message(device, call, args, error, message)


@pytest.mark.skipif(not HAS_CUDA, reason="the GPU's launch configs (the interpreter runs the smallest)")
def test_gpu_topk_at_benchmark_sizes():
    """k = 2048 (DeepSeek's) and 4096 over long rows, and the fused kernel with its k = 2048 buffer compacting."""
    logits = make_logits(8, 65536, torch.float32, seed=1).cuda()
    for k in (2048, 4096):
        assert_valid_topk(musetalk_fast.ops.topk_indices(logits, k), logits, k)
    args = make_inputs((96, 6000, 64, 128, "full"), torch.float8_e4m3fn, 2, device="cuda")
    fused = musetalk_fast.ops.lightning_indexer_topk(*args, 2048)
    logits = reference.lightning_indexer(*[t.cpu() for t in args])
    assert_valid_topk(fused, logits, 2048, name="fused", atol=indexer_allowance(args, logits))


@pytest.mark.skipif(not HAS_CUDA or not has_cuda_kernel("topk_indices_cudacpp"),
                    reason="the CUDA C++ candidate runs only on a GPU with the CUDA build (compiled here by nvcc)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_cudacpp_radix_select_is_a_correct_topk(dtype):
    """The CUDA C++ candidate (csrc/topk/cuda.cu), the same checks as the Triton kernel."""
    for num_rows, num_keys, k, kind in TOPK_CASES + [(8, 65536, 2048, "none"), (4, 70000, 4096, "ragged")]:
        logits = make_logits(num_rows, num_keys, dtype, seed=num_keys + k).cuda()
        ks, ke = (None, None) if kind == "none" else [t.cuda() for t in key_ranges(kind, num_rows, num_keys, k)]
        for sorted_ in (False, True):
            indices = torch.ops.musetalk_fast.topk_indices_cudacpp(logits, k, ks, ke, sorted_)
            assert_valid_topk(indices, logits, k, ks, ke, name=f"{num_rows}x{num_keys} k={k} sorted={sorted_}")

"""engram_hash, engram_gather, engram_lookup: the CPU C++ kernels and the Triton kernels vs the
reference (the hash bit for bit, incl. negative/huge ids and pads before the start), dense and
sparse gradients, gradcheck, opcheck, torch.compile, bad input (the same message from C++ and
Python), the async lookup, and the GPU-only paths (pinned host tables, overlap; skipped without CUDA)."""
import re

import pytest
import torch

import musetalk_fast
from musetalk_fast import reference
from musetalk_fast.ops.engram import check_table_device
from tests.helpers import DEVICES, HAS_CUDA, assert_close_to_reference, backend_device, kernel_backends, seeded

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOATS = "float16, bfloat16, float32 or float64"


def hash_args(seed, orders=2, heads=3, max_n=3, device="cpu", huge=False):
    """Odd multipliers (order o uses o + 2 of them, capped at max_n), prime-ish moduli, stacked offsets."""
    gen = seeded(seed)
    multipliers = torch.zeros(orders, max_n, dtype=torch.int64)
    for o in range(orders):
        n = min(o + 2, max_n)
        high = 2**62 if huge else 2**20
        multipliers[o, :n] = torch.randint(0, high, (n,), generator=gen) * 2 + 1
    moduli = torch.randint(3, 50, (orders, heads), generator=gen)
    offsets = moduli.flatten().cumsum(0) - moduli.flatten()
    return [t.to(device) for t in (multipliers, moduli, offsets)], int(moduli.sum())


def make_ids(batch, length, seed, huge=False, device="cpu"):
    gen = seeded(seed)
    if huge:  # the whole int64 range, with its extremes
        ids = torch.randint(INT64_MIN, INT64_MAX, (batch, length), generator=gen, dtype=torch.int64)
        ids.view(-1)[: min(4, ids.numel())] = torch.tensor([INT64_MIN, INT64_MAX, -1, 0])[: min(4, ids.numel())]
    else:
        ids = torch.randint(-5, 1000, (batch, length), generator=gen)
    return ids.to(device)


def kernel_op(backend, name):
    """The op as the backend runs it: the Triton launcher under the interpreter, else the public op."""
    if backend == "triton-interpreter":
        from musetalk_fast.kernels import engram as kernels

        return getattr(kernels, name)
    return getattr(musetalk_fast.ops, name)


HASH_CASES = [(2, 7, 2, 3, 3, False), (1, 1, 1, 1, 1, False), (3, 5, 2, 4, 2, True), (2, 9, 3, 2, 4, True),
              (0, 4, 2, 2, 3, False), (2, 0, 2, 2, 3, False), (2, 3, 0, 2, 3, False)]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("batch,length,orders,heads,max_n,huge", HASH_CASES)
def test_hash_is_bit_identical_to_reference(backend, batch, length, orders, heads, max_n, huge):
    device = backend_device(backend)
    (multipliers, moduli, offsets), _ = hash_args(batch + length, orders, heads, max_n, device, huge)
    ids = make_ids(batch, length, 7, huge, device)
    for pad_id in (0, 3, -7, INT64_MAX, INT64_MIN):
        got = kernel_op(backend, "engram_hash")(ids, multipliers, moduli, offsets, pad_id)
        want = reference.engram_hash(ids.cpu(), multipliers.cpu(), moduli.cpu(), offsets.cpu(), pad_id)
        assert got.dtype == torch.int64 and torch.equal(got.cpu(), want), f"pad_id={pad_id}"


def test_hash_matches_python_integers():
    """The reference itself against arbitrary-precision integers, wrapped to int64 by hand."""
    def wrap(v):
        return (v + 2**63) % 2**64 - 2**63

    (multipliers, moduli, offsets), _ = hash_args(3, orders=2, heads=2, max_n=3, huge=True)
    ids = make_ids(2, 5, 4, huge=True)
    pad_id = INT64_MAX - 2  # no double holds it
    rows = reference.engram_hash(ids, multipliers, moduli, offsets, pad_id)
    for b in range(2):
        for t in range(5):
            for o in range(2):
                mix = 0
                for j in range(3):
                    x = int(ids[b, t - j]) if t - j >= 0 else pad_id
                    mix = wrap(mix ^ wrap(x * int(multipliers[o, j])))
                for h in range(2):
                    assert int(rows[b, t, 2 * o + h]) == int(offsets[2 * o + h]) + mix % int(moduli[o, h])


# (rows shape, E): ragged widths, a single row, empty index sets and empty rows.
GATHER_SHAPES = [((2, 5, 3), 8), ((7,), 80), ((3, 4), 17), ((1,), 1), ((2, 3), 33), ((0, 3), 8), ((4,), 0), ((), 5)]


def table_and_rows(rows_shape, width, seed, dtype, device, num_rows=37):
    table = torch.randn(num_rows, width, generator=seeded(seed), dtype=torch.float64).to(dtype).to(device)
    rows = torch.randint(0, num_rows, rows_shape, generator=seeded(seed + 1)).to(device)
    return table, rows


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rows_shape,width", GATHER_SHAPES)
def test_gather_copies_the_rows(backend, dtype, rows_shape, width):
    table, rows = table_and_rows(rows_shape, width, 11, dtype, backend_device(backend))
    out = kernel_op(backend, "engram_gather")(table, rows)
    assert out.dtype == dtype and out.shape == (*rows_shape, width) and out.device == rows.device
    assert torch.equal(out.cpu(), reference.engram_gather(table.cpu(), rows.cpu()))  # a copy: bit-exact


@pytest.mark.parametrize("backend", kernel_backends())
def test_gather_reads_strided_tables_without_copies(backend):
    device = backend_device(backend)
    base = torch.randn(40, 24, generator=seeded(3)).to(device)
    rows = torch.randint(0, 20, (3, 5), generator=seeded(4)).to(device)
    for table in (base[::2, 4:20], base[:20, :12].t()[:, :10].t(), base.t()):  # row stride > E; column stride > 1
        rows_in = rows.clamp(max=table.shape[0] - 1)
        assert torch.equal(kernel_op(backend, "engram_gather")(table, rows_in).cpu(),
                           reference.engram_gather(table.cpu(), rows_in.cpu()))


LOOKUP_CASES = [(2, 6, 2, 3, 3, 8, torch.float32), (1, 5, 2, 2, 3, 80, torch.bfloat16),
                (3, 4, 1, 2, 2, 5, torch.float16),
                (2, 3, 2, 1, 3, 7, torch.float64), (0, 4, 2, 2, 3, 4, torch.float32), (2, 3, 2, 2, 3, 0, torch.float32)]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("batch,length,orders,heads,max_n,width,dtype", LOOKUP_CASES)
def test_lookup_is_hash_then_gather(backend, batch, length, orders, heads, max_n, width, dtype):
    device = backend_device(backend)
    (multipliers, moduli, offsets), num_rows = hash_args(length, orders, heads, max_n, device, huge=True)
    ids = make_ids(batch, length, 5, huge=True, device=device)
    table = torch.randn(num_rows + 3, width, generator=seeded(6), dtype=torch.float64).to(dtype).to(device)
    out = kernel_op(backend, "engram_lookup")(ids, table, multipliers, moduli, offsets, 2)
    want = reference.engram_lookup(*(t.cpu() for t in (ids, table, multipliers, moduli, offsets)), 2)
    assert out.dtype == dtype and torch.equal(out.cpu(), want)


def reference_table_grad(table, rows, grad):
    exact = table.detach().double().cpu().requires_grad_()
    (g,) = torch.autograd.grad(reference.engram_gather(exact, rows.cpu()), exact, grad.double().cpu())
    return g


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rows_shape,width", [((4, 9, 3), 8), ((50,), 33), ((0, 2), 4), ((3,), 0)])
def test_dense_backward_sums_each_row_deterministically(backend, dtype, rows_shape, width):
    device = backend_device(backend)
    table, _ = table_and_rows(rows_shape, width, 2, dtype, device, num_rows=11)
    rows = torch.randint(0, 6, rows_shape, generator=seeded(9)).to(device)  # many repeats, rows 6..10 untouched
    grad = torch.randn(*rows_shape, width, generator=seeded(10), dtype=torch.float64).to(dtype).to(device)
    if backend == "triton-interpreter":
        from musetalk_fast.kernels.engram import engram_gather_backward

        run = lambda: engram_gather_backward(grad, rows, 11)  # noqa: E731
    else:
        run = lambda: torch.ops.musetalk_fast.engram_gather_backward(grad, rows, 11)  # noqa: E731
    got = run()
    assert got.dtype == dtype and got.shape == (11, width)
    exact = reference_table_grad(table, rows, grad)
    if dtype == torch.bfloat16:  # summed in fp32, rounded once; PyTorch's bf16 embedding backward as the baseline
        same_math = reference_table_grad(table.float(), rows, grad.float()).to(dtype)
        assert_close_to_reference(got, exact, same_math, name="dtable")
    else:
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
        assert_close_to_reference(got, exact, name="dtable", **tol)
    assert torch.equal(run(), got)  # the same bits again


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["engram_gather", "engram_lookup"])
def test_autograd_dense_and_sparse_gradients(device, name):
    (multipliers, moduli, offsets), num_rows = hash_args(1, device=device)
    ids = make_ids(2, 6, 3, device=device)
    rows = reference.engram_hash(ids, multipliers, moduli, offsets)
    table = torch.randn(num_rows, 5, generator=seeded(2), dtype=torch.float64).to(device)
    grad = torch.randn(2, 6, rows.shape[-1], 5, generator=seeded(3), dtype=torch.float64).to(device)

    def call(t, sparse):
        if name == "engram_gather":
            return musetalk_fast.ops.engram_gather(t, rows, sparse)
        return musetalk_fast.ops.engram_lookup(ids, t, multipliers, moduli, offsets, 0, sparse).view_as(grad)

    want = reference_table_grad(table, rows, grad)
    for sparse in (False, True):
        leaf = table.clone().requires_grad_()
        (got,) = torch.autograd.grad(call(leaf, sparse), leaf, grad)
        assert got.is_sparse == sparse and got.device == table.device
        torch.testing.assert_close((got.to_dense() if sparse else got).cpu(), want, rtol=1e-12, atol=1e-12)


def test_sparse_gradient_trains_with_sparse_adam():
    (multipliers, moduli, offsets), num_rows = hash_args(4)
    ids = make_ids(2, 8, 5)
    table = torch.nn.Parameter(torch.zeros(num_rows, 4))
    optimizer = torch.optim.SparseAdam([table], lr=0.1)
    target = torch.ones(2, 8, 6 * 4)
    for _ in range(30):
        optimizer.zero_grad()
        out = musetalk_fast.ops.engram_lookup(ids, table, multipliers, moduli, offsets, sparse=True)
        loss = (out - target).square().mean()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2
    touched = torch.zeros(num_rows, dtype=torch.bool)
    touched[reference.engram_hash(ids, multipliers, moduli, offsets).flatten()] = True
    assert (table.detach()[~touched] == 0).all()  # a sparse update leaves the other rows alone


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    (multipliers, moduli, offsets), num_rows = hash_args(2, device=device)
    ids = make_ids(2, 4, 1, device=device)
    rows = reference.engram_hash(ids, multipliers, moduli, offsets)
    table = torch.randn(num_rows, 3, dtype=torch.float64, generator=seeded(5)).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: musetalk_fast.ops.engram_gather(t, rows), (table,))
    assert torch.autograd.gradcheck(lambda t: musetalk_fast.ops.engram_lookup(ids, t, multipliers, moduli, offsets, 1),
                                    (table,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    (multipliers, moduli, offsets), num_rows = hash_args(6, device=device)
    ids = make_ids(2, 5, 2, device=device)
    rows = reference.engram_hash(ids, multipliers, moduli, offsets)
    table = torch.randn(num_rows, 4, generator=seeded(7)).to(device).requires_grad_()
    ops = torch.ops.musetalk_fast
    torch.library.opcheck(ops.engram_hash.default, (ids, multipliers, moduli, offsets, 3))
    torch.library.opcheck(ops.engram_gather.default, (table, rows, False))
    torch.library.opcheck(ops.engram_lookup.default, (ids, table, multipliers, moduli, offsets, 3, False))
    grad = torch.randn(*rows.shape, 4, generator=seeded(8)).to(device)
    torch.library.opcheck(ops.engram_gather_backward.default, (grad, rows, num_rows))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    (multipliers, moduli, offsets), num_rows = hash_args(8, device=device)
    ids = make_ids(2, 5, 9, device=device)

    def loss_fn(table):
        rows = musetalk_fast.ops.engram_hash(ids, multipliers, moduli, offsets, 1)
        emb = musetalk_fast.ops.engram_gather(table, rows)
        looked_up = musetalk_fast.ops.engram_lookup(ids, table, multipliers, moduli, offsets, 1)
        return (emb.flatten(-2) * looked_up).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    table = torch.randn(num_rows, 4, generator=seeded(10)).to(device).requires_grad_()
    loss = compiled(table)
    (grad,) = torch.autograd.grad(loss, table)
    leaf = table.detach().requires_grad_()
    (expected,) = torch.autograd.grad(loss_fn(leaf), leaf)
    torch.testing.assert_close(loss, loss_fn(table.detach()))
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_async_lookup_gives_the_lookup(device):
    (multipliers, moduli, offsets), num_rows = hash_args(12, device=device)
    ids = make_ids(3, 7, 13, device=device)
    table = torch.randn(num_rows, 6, generator=seeded(14)).to(device).requires_grad_()
    handle = musetalk_fast.ops.engram_lookup_async(ids, table, multipliers, moduli, offsets, 4)
    out = handle.wait()
    torch.testing.assert_close(out, reference.engram_lookup(ids, table.detach(), multipliers, moduli, offsets, 4))
    (grad,) = torch.autograd.grad(out.sum(), table)  # differentiable as engram_lookup
    assert torch.equal(grad, torch.ops.musetalk_fast.engram_gather_backward(
        torch.ones(3, 7, 6, 6, device=device), reference.engram_hash(ids, multipliers, moduli, offsets, 4), num_rows))


# Bad input: each message whole, the same from the C++ checks (CPU tensors) and the Python ones (fake
# tensors, which torch.compile traces with; CUDA tensors).

def good(name, **changes):
    ids = torch.randint(0, 50, (2, 5), generator=seeded(5))
    engram = dict(multipliers=torch.tensor([[3, 0], [5, 7]]), moduli=torch.tensor([[7, 11], [13, 17]]),
                  offsets=torch.tensor([0, 7, 18, 31]))  # rows in [0, 48)
    table = torch.randn(48, 4, generator=seeded(6))
    args = {
        "engram_hash": dict(ids=ids, **engram),
        "engram_gather": dict(table=table, rows=reference.engram_hash(ids, **engram)),
        "engram_lookup": dict(ids=ids, table=table, **engram),
        "engram_gather_backward": dict(grad=torch.randn(2, 5, 4, 4), rows=reference.engram_hash(ids, **engram),
                                       num_rows=48),
    }[name]
    return {**args, **changes}


def bad(name, error, message, **changes):
    return pytest.param(name, good(name, **changes), error, message, id=f"{name}: {message}")


META = "cpu, got meta"
BAD_INPUTS = [
    bad("engram_hash", TypeError, "ids must be int64, got int32", ids=torch.zeros(2, 5, dtype=torch.int32)),
    bad("engram_hash", TypeError, "multipliers must be int64, got float32", multipliers=torch.ones(2, 2)),
    bad("engram_hash", TypeError, "moduli must be int64, got int32", moduli=torch.ones(2, 2, dtype=torch.int32)),
    bad("engram_hash", TypeError, "offsets must be int64, got int32", offsets=torch.zeros(4, dtype=torch.int32)),
    bad("engram_hash", ValueError, "ids must have rank 2, got shape [10]", ids=torch.zeros(10, dtype=torch.int64)),
    bad("engram_hash", ValueError, "multipliers must have rank 2, got shape [2]", multipliers=torch.tensor([3, 5])),
    bad("engram_hash", ValueError, "multipliers must have shape [O, Nmax] with Nmax >= 1, got [2, 0]",
        multipliers=torch.zeros(2, 0, dtype=torch.int64)),
    bad("engram_hash", ValueError, "moduli must have shape [O, Hh] = [2, Hh], got [3, 2]",
        moduli=torch.ones(3, 2, dtype=torch.int64)),
    bad("engram_hash", ValueError, "moduli must have shape [O, Hh] = [2, Hh], got [4]",
        moduli=torch.tensor([7, 11, 13, 17])),
    bad("engram_hash", ValueError, "offsets must have shape [O*Hh] = [4], got [3]", offsets=torch.tensor([0, 7, 18])),
    bad("engram_hash", ValueError, "offsets must have shape [O*Hh] = [4], got [2, 2]",
        offsets=torch.tensor([[0, 7], [18, 31]])),
    bad("engram_hash", ValueError, f"moduli must be on ids' device {META}",
        moduli=torch.ones(2, 2, dtype=torch.int64, device="meta")),
    bad("engram_hash", ValueError, f"offsets must be on ids' device {META}",
        offsets=torch.zeros(4, dtype=torch.int64, device="meta")),
    bad("engram_hash", ValueError, "moduli must all be > 0, got 0", moduli=torch.tensor([[7, 11], [0, 17]])),
    bad("engram_hash", ValueError, "moduli must all be > 0, got -3", moduli=torch.tensor([[7, -3], [13, 17]])),
    bad("engram_hash", ValueError, "multipliers must be odd in each order's leading entries and 0 after them, "
        "got 4 at [1, 1]", multipliers=torch.tensor([[3, 0], [5, 4]])),
    bad("engram_hash", ValueError, "multipliers must be odd in each order's leading entries and 0 after them, "
        "got 0 at [0, 0]", multipliers=torch.tensor([[0, 0], [5, 7]])),
    bad("engram_hash", ValueError, "multipliers must be odd in each order's leading entries and 0 after them, "
        "got 9 at [0, 2]", multipliers=torch.tensor([[3, 0, 9], [5, 7, -1]])),
    bad("engram_gather", TypeError, f"table must be {FLOATS}, got int64", table=torch.zeros(48, 4, dtype=torch.int64)),
    bad("engram_gather", TypeError, "rows must be int64, got int32", rows=torch.zeros(2, 3, dtype=torch.int32)),
    bad("engram_gather", ValueError, "table must have rank 2, got shape [48]", table=torch.randn(48)),
    bad("engram_gather", ValueError, "rows must be in [0, R) = [0, 48), got -1", rows=torch.tensor([[0, -1], [5, 47]])),
    bad("engram_gather", ValueError, "rows must be in [0, R) = [0, 48), got 48", rows=torch.tensor([[0, 48], [5, 47]])),
    bad("engram_gather", ValueError, "rows must be in [0, R) = [0, 48), got -7", rows=torch.tensor([-7, 100])),
    bad("engram_gather", ValueError, "rows must be in [0, R) = [0, 0), got 0", table=torch.randn(0, 4),
        rows=torch.tensor([0])),
    bad("engram_lookup", TypeError, "ids must be int64, got int32", ids=torch.zeros(2, 5, dtype=torch.int32)),
    bad("engram_lookup", ValueError, "offsets must have shape [O*Hh] = [4], got [3]", offsets=torch.tensor([0, 7, 18])),
    bad("engram_lookup", ValueError, "moduli must all be > 0, got -1", moduli=torch.tensor([[7, 11], [13, -1]])),
    bad("engram_lookup", TypeError, f"table must be {FLOATS}, got int64", table=torch.zeros(48, 4, dtype=torch.int64)),
    bad("engram_lookup", ValueError, "table must have rank 2, got shape [48, 4, 1]", table=torch.randn(48, 4, 1)),
    bad("engram_lookup", ValueError, "hashed rows (offsets + hash mod moduli) must be in [0, R) = [0, 48): "
        "table 3 spans [31, 49)", moduli=torch.tensor([[7, 11], [13, 18]])),
    bad("engram_lookup", ValueError, "hashed rows (offsets + hash mod moduli) must be in [0, R) = [0, 48): "
        "table 1 spans [-2, 9)", offsets=torch.tensor([0, -2, 18, 31])),
    bad("engram_lookup", ValueError, "hashed rows (offsets + hash mod moduli) must be in [0, R) = [0, 48): "
        f"table 0 spans [{INT64_MAX}, {INT64_MAX + 7})", offsets=torch.tensor([INT64_MAX, 7, 18, 31])),
    bad("engram_gather_backward", TypeError, "grad must be float16, bfloat16, float32 or float64, got int64",
        grad=torch.zeros(2, 5, 4, 4, dtype=torch.int64)),
    bad("engram_gather_backward", ValueError, "grad must have shape [*rows.shape, E] = [2, 5, 4, E], got [2, 5, 4]",
        grad=torch.zeros(2, 5, 4)),
    bad("engram_gather_backward", ValueError, "num_rows must be >= 0, got -1", num_rows=-1),
    bad("engram_gather_backward", ValueError, "rows must be in [0, R) = [0, 40), got 47", num_rows=40,
        grad=torch.zeros(1, 2, 4), rows=torch.tensor([[0, 47]])),
]
# Read values, so they run on real tensors only (a FakeTensor has none).
DATA_DEPENDENT = ("moduli must all be > 0", "must be in [0, R)", "multipliers must be odd")


def is_data_dependent(message):
    return any(part in message for part in DATA_DEPENDENT)


def exactly(message):
    return "^" + re.escape(message) + "$"


def call(name, args):
    if name == "engram_gather_backward":
        return torch.ops.musetalk_fast.engram_gather_backward(**args)
    return getattr(musetalk_fast.ops, name)(**args)


def first_line(error):
    return str(error).splitlines()[0]


@pytest.mark.parametrize("name,args,error,message", BAD_INPUTS)
def test_bad_input_names_the_argument(name, args, error, message):
    with pytest.raises(error) as raised:
        call(name, args)
    assert first_line(raised.value) == message


@pytest.mark.parametrize("name,args,error,message", [p for p in BAD_INPUTS if not is_data_dependent(p.values[3])])
def test_bad_input_is_caught_on_fake_tensors(name, args, error, message):
    """What torch.compile traces with (and what the CUDA path runs): the Python checks say the same."""
    with pytest.raises(error, match=exactly(message)):
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            call(name, {n: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for n, a in args.items()})


@pytest.mark.parametrize("name,args,error,message", [p for p in BAD_INPUTS if is_data_dependent(p.values[3])])
def test_python_value_checks_say_what_cpp_says(name, args, error, message):
    """The Python checks the CUDA path runs, on the same real tensors: the same message as C++."""
    from musetalk_fast.ops import engram

    check = {"engram_hash": engram.check_hash, "engram_gather": engram.check_gather,
             "engram_lookup": engram.check_lookup, "engram_gather_backward": engram.check_gather_backward}[name]
    with pytest.raises(error, match=exactly(message)):
        check(**args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:  # no values: traced, not checked
        call(name, {n: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for n, a in args.items()})
    call(name, {n: a.to("meta") if isinstance(a, torch.Tensor) else a for n, a in args.items()})


def test_value_checks_read_each_tensor_once_until_it_changes(monkeypatch):
    """On the GPU every value check is a device sync: a check that passed is not repeated on the same,
    unchanged tensors (a model's hash buffers), but is on new tensors and after an in-place change."""
    from musetalk_fast.ops import engram

    reads = []
    for name in ("_check_multiplier_values", "_check_moduli_values", "_check_span_values", "_check_row_values"):
        real = getattr(engram, name)
        monkeypatch.setattr(engram, name, lambda *a, real=real, name=name: (reads.append(name), real(*a))[1])
    args = good("engram_lookup")
    engram.check_lookup(**args)
    assert sorted(reads) == ["_check_moduli_values", "_check_multiplier_values", "_check_span_values"]
    engram.check_lookup(**args)
    engram.check_hash(args["ids"], args["multipliers"], args["moduli"], args["offsets"])
    assert len(reads) == 3  # remembered
    engram.check_lookup(**{**args, "offsets": args["offsets"].clone()})
    assert reads[3:] == ["_check_span_values"]  # a new tensor object: checked
    args["moduli"][1, 1] = 0  # in place: the version counter moves on
    with pytest.raises(ValueError, match=exactly("moduli must all be > 0, got 0")):
        engram.check_lookup(**args)
    rows = good("engram_gather")["rows"]
    engram.check_rows_in_table(rows, 48, "rows")
    engram.check_rows_in_table(rows, 48, "rows")
    assert reads.count("_check_row_values") == 1
    with pytest.raises(ValueError, match=exactly(f"rows must be in [0, R) = [0, 40), got {int(rows.max())}")):
        engram.check_rows_in_table(rows, 40, "rows")  # another table size: another check
    rows[0, 0, 0] = -1
    with pytest.raises(ValueError, match=exactly("rows must be in [0, R) = [0, 48), got -1")):
        engram.check_rows_in_table(rows, 48, "rows")
    with torch.inference_mode():  # no version counter: checked every time
        frozen = torch.tensor([[7, 11], [13, 17]])
        engram.check_hash(args["ids"], args["multipliers"], frozen, args["offsets"])
        engram.check_hash(args["ids"], args["multipliers"], frozen, args["offsets"])
    assert reads.count("_check_moduli_values") == 4


def test_remembered_checks_go_with_their_tensors():
    import gc

    from musetalk_fast.ops import engram

    rows = good("engram_gather")["rows"]
    engram.check_rows_in_table(rows, 48, "rows")
    key = (("rows in table", 48), (id(rows),))
    assert key in engram._passed
    del rows
    gc.collect()
    assert key not in engram._passed


def test_lookup_backward_knows_its_rehashed_rows_are_in_the_table(monkeypatch):
    """The backward recomputes the rows from the forward's (checked) hash tensors: the dense gradient
    kernel's rows check then reads nothing (on the GPU: no sync in the backward)."""
    from musetalk_fast.ops import engram

    args = good("engram_lookup")
    engram.check_lookup(**args)  # what the CUDA path runs in the forward
    remembered = []
    real = engram._remember_passed
    monkeypatch.setattr(engram, "_remember_passed", lambda key, tensors: (remembered.append(key), real(key, tensors)))
    table = args["table"].clone().requires_grad_()
    out = musetalk_fast.ops.engram_lookup(args["ids"], table, args["multipliers"], args["moduli"], args["offsets"])
    out.sum().backward()
    assert ("rows in table", 48) in remembered


def test_pageable_host_table_with_cuda_indices_is_rejected():
    table, cuda = torch.randn(48, 4), torch.empty(0, device="meta")
    cuda_ref = type("Ref", (), {"device": torch.device("cuda", 0)})()  # a CUDA tensor's device, without a GPU
    with pytest.raises(ValueError, match=exactly("table must be on rows' device cuda:0 or in pinned host memory, "
                                                 "got a cpu tensor that is not pinned (use table.pin_memory())")):
        check_table_device(table, cuda_ref, "rows")
    check_table_device(table, table, "rows")  # same device
    check_table_device(table.to("meta"), cuda, "ids")  # a fake/meta table: nothing to read


@pytest.mark.parametrize("batch,length,orders", [(0, 5, 2), (2, 0, 2), (2, 3, 0)])
def test_empty_sizes_give_empty_outputs(batch, length, orders):
    ids = torch.randint(0, 50, (batch, length), dtype=torch.int64)
    multipliers = torch.tensor([[3, 0], [5, 7]], dtype=torch.int64)[:orders]
    moduli = torch.tensor([[7, 11], [13, 17]], dtype=torch.int64)[:orders]
    offsets = torch.tensor([0, 7, 18, 31], dtype=torch.int64)[: 2 * orders]
    table = torch.randn(48, 4)
    assert musetalk_fast.ops.engram_hash(ids, multipliers, moduli, offsets).shape == (batch, length, 2 * orders)
    out = musetalk_fast.ops.engram_lookup(ids, table, multipliers, moduli, offsets)
    assert out.shape == (batch, length, 8 * orders)


# GPU only: pinned host tables, devices, overlap ----------------------------------------------------

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pinned_host_table_is_read_by_the_kernel(dtype):
    (multipliers, moduli, offsets), num_rows = hash_args(20, device="cuda")
    ids = make_ids(4, 33, 21, device="cuda")
    table = torch.randn(num_rows, 80, generator=seeded(22)).to(dtype).pin_memory()
    rows = musetalk_fast.ops.engram_hash(ids, multipliers, moduli, offsets)
    emb = musetalk_fast.ops.engram_gather(table, rows)
    out = musetalk_fast.ops.engram_lookup(ids, table, multipliers, moduli, offsets)
    assert emb.is_cuda and out.is_cuda
    assert torch.equal(emb.cpu(), table[rows.cpu()])
    assert torch.equal(out.cpu(), table[rows.cpu()].flatten(-2))
    leaf = table.clone().pin_memory().requires_grad_()
    (grad,) = torch.autograd.grad(musetalk_fast.ops.engram_gather(leaf, rows).sum(), leaf)
    assert grad.device.type == "cpu"
    with pytest.raises(ValueError, match="not pinned"):
        musetalk_fast.ops.engram_gather(table.clone(), rows)  # pageable: the GPU cannot read it


@needs_cuda
def test_async_lookup_overlaps_compute_on_the_main_stream():
    """The lookup's kernel runs while a matmul queued after it on the main stream runs."""
    (multipliers, small_moduli, _), _ = hash_args(30, orders=2, heads=8, device="cuda")
    moduli = small_moduli * 4096 + 1  # ~100K rows a table
    offsets = moduli.flatten().cumsum(0) - moduli.flatten()
    table = torch.randn(int(moduli.sum()), 80, dtype=torch.bfloat16).pin_memory()  # read over PCIe: slow
    ids = make_ids(16, 4096, 31, device="cuda")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # compile and warm up
        musetalk_fast.ops.engram_lookup_async(ids, table, multipliers, moduli, offsets).wait()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        handle = musetalk_fast.ops.engram_lookup_async(ids, table, multipliers, moduli, offsets)
        for _ in range(20):
            a = (a @ a).tanh_()
        handle.wait()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    lookups = [e for e in events if "engram_lookup_kernel" in e.name]
    others = [e for e in events if "engram" not in e.name and "Memcpy" not in e.name]
    assert lookups and others
    lookup = lookups[0].time_range
    assert any(o.time_range.start < lookup.end and lookup.start < o.time_range.end for o in others), \
        "no kernel of the main stream ran during the lookup"


VECTOR_PROBE = """
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from musetalk_fast.kernels import engram as en

for kernel in (en.engram_gather_kernel, en.engram_lookup_kernel):
    for width in (40, 80):  # 80- and 160-byte bf16 rows; 40 is no multiple of Triton's 16-element specialisation
        constexprs = dict(WIDTH=width, BLOCK_N=32, BLOCK_E=64 if width == 40 else 128, ALIGN=8, col_stride=1)
        types = dict(table_ptr="*bf16", out_ptr="*bf16", pad_id="i64")
        signature = {n: "constexpr" if n in constexprs else types.get(n, "*i64" if n.endswith("_ptr") else "i32")
                     for n in kernel.arg_names}
        constants = {(kernel.arg_names.index(n),): v for n, v in constexprs.items()}
        aligned = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in ("table_ptr", "out_ptr")}
        compiled = triton.compile(ASTSource(kernel, signature, constants, aligned), target=GPUTarget("cuda", 90, 32))
        vectors = sorted(set(re.findall(r"(?:ld|st)\\.global\\.v4\\.b32", compiled.asm["ptx"])))
        print(kernel.__name__, width, " ".join(vectors))
kernel = en.engram_hash_kernel
constexprs = dict(BLOCK_T=256, BLOCK_H=8)
signature = {n: "constexpr" if n in constexprs else "*i64" if n.endswith("_ptr") else "i64" if n == "pad_id" else "i32"
             for n in kernel.arg_names}
constants = {(kernel.arg_names.index(n),): v for n, v in constexprs.items()}
ptx = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
print("hash", " ".join(sorted(set(re.findall(r"mul\\.lo\\.s64|rem\\.s64|xor\\.b64", ptx)))))
"""


def test_sm90_code_copies_16_byte_vectors_and_hashes_in_wrapping_int64():
    """Compiled here for the H100, no GPU needed: the gather and the fused lookup load and store bf16
    rows as 16-byte vectors (ld/st.global.v4.b32), also for widths that are no multiple of 16 elements;
    the hash multiplies with mul.lo.s64 (the low 64 bits: wraps) and takes rem.s64 (C's remainder,
    the dividend's sign, which the kernel shifts to non-negative)."""
    import os
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    if not hasattr(triton, "compile"):
        pytest.skip("this Triton cannot compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", VECTOR_PROBE], capture_output=True, text=True, env=env, timeout=300)
    if "No module named" in result.stderr and "nvidia" in result.stderr:
        pytest.skip("this Triton ships no NVIDIA backend")
    assert result.returncode == 0, result.stderr
    *copies, hashing = result.stdout.splitlines()
    assert len(copies) == 4
    for line in copies:
        assert line.endswith("ld.global.v4.b32 st.global.v4.b32"), line
    assert hashing == "hash mul.lo.s64 rem.s64 xor.b64"


def test_benchmark_cases_compare_like_with_like():
    """Every implementation timed in a case of bench/ops/engram.py computes the same thing (CPU shapes)."""
    from musetalk_fast.bench.ops import engram as bench

    cases = bench.cases("cpu")
    assert {case.op for case in cases} == {"engram gather", "engram lookup (fused)", "engram gather dense bwd"}
    for case in cases:
        outputs = [fn() for fn in {**case.ours, **case.baselines}.values()]
        for other in outputs[1:]:
            torch.testing.assert_close(other.reshape(outputs[0].shape).float(), outputs[0].float(),
                                       rtol=2e-2, atol=2e-2)

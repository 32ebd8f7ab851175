"""engram_hash, engram_gather, engram_lookup: DeepSeek Engram's hashed n-gram memory (docs/ops.md §6).

CPU: csrc/engram/cpu.cpp. CUDA: the Triton kernels of kernels/engram.py; the table may be on the
GPU or in pinned host memory (read by the kernel over PCIe). Gradient w.r.t. the table only: dense
through engram_gather_backward (sort + per-row sums, deterministic) or, with sparse=True, a sparse
COO tensor of (rows, grad) as nn.Embedding(sparse=True) gives. engram_lookup_async runs a lookup on
a side stream so that it overlaps the compute issued after it.

The checks below say exactly what the C++ ones say (tests/ops/test_engram.py compares them); the
ones that read values (moduli > 0, odd multipliers, rows inside the table) run on real tensors only.
On the GPU each such read is a device sync; a value check that passed is remembered for those very
tensor objects until they change (see _value_check), so a model's constant hash tensors are read once.
"""
import weakref

import torch

from .backend import routable
from .checks import check_device, check_dtype, check_float, check_rank, check_shape, has_data
from .library import op, qualname, register_cuda

INT64 = (torch.int64,)


# Value checks already passed ------------------------------------------------------------------------
# A value check reads tensors back to the host: for CUDA tensors a device sync, which stalls the host
# until the queued work is done (every layer's lookup, its backward, and engram_lookup_async, whose
# side stream has waited for the main one). Its inputs are mostly a model's buffers (multipliers,
# moduli, offsets), the same tensor objects every call, and rows the backward reads again: a check
# that passed is remembered for those objects at their version counters (which every in-place change
# bumps), keyed by id() with weak references, so that an entry goes with its tensors and a new tensor
# at a reused id never inherits it. (A write through .data bypasses the version counter: the kernels
# still mask rows outside the table, but then without the ValueError.)

_passed = {}  # (check key, ids) -> (weak references, versions)


def _versions(tensors):
    if any(t.is_inference() for t in tensors):  # inference tensors have no version counter
        return None
    return tuple(t._version for t in tensors)


def _passed_before(key, tensors):
    entry = _passed.get((key, tuple(id(t) for t in tensors)))
    versions = _versions(tensors)
    return (entry is not None and versions is not None and entry[1] == versions
            and all(ref() is t for ref, t in zip(entry[0], tensors)))


def _remember_passed(key, tensors):
    versions = _versions(tensors)
    if versions is None:
        return
    full_key = (key, tuple(id(t) for t in tensors))

    def forget(_, full_key=full_key):
        _passed.pop(full_key, None)

    _passed[full_key] = (tuple(weakref.ref(t, forget) for t in tensors), versions)


def _value_check(key, tensors, check):
    """check() (which reads the values of `tensors`), unless it passed on these tensors unchanged since."""
    if _passed_before(key, tensors):
        return
    check()
    _remember_passed(key, tensors)


# Checks ---------------------------------------------------------------------------------------------

def check_multipliers(multipliers):
    """Each order's row: odd multipliers (an even one drops an id's low bit), then zeros."""
    if multipliers.numel() == 0 or not has_data(multipliers):
        return
    _value_check("odd multipliers", (multipliers,), lambda: _check_multiplier_values(multipliers))


def _check_multiplier_values(multipliers):
    m = multipliers.cpu()
    leading = torch.ones_like(m, dtype=torch.bool)
    leading[:, 1:] = (m[:, 1:] != 0).long().cumprod(dim=1).bool()
    bad = torch.where(leading, m % 2 == 0, m != 0)
    if bad.any():
        o, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"multipliers must be odd in each order's leading entries and 0 after them, "
                         f"got {int(m[o, j])} at [{o}, {j}]")


def check_hash(ids, multipliers, moduli, offsets, pad_id=0):
    named = (("multipliers", multipliers), ("moduli", moduli), ("offsets", offsets))
    check_dtype(ids, "ids", INT64)
    for name, t in named:
        check_dtype(t, name, INT64)
    for name, t in named:
        check_device(t, ids, name, "ids")
    check_rank(ids, 2, "ids")
    check_rank(multipliers, 2, "multipliers")
    orders, max_n = multipliers.shape
    if max_n < 1:
        raise ValueError(f"multipliers must have shape [O, Nmax] with Nmax >= 1, got {list(multipliers.shape)}")
    check_shape(moduli, "moduli", "O, Hh", [orders, None])
    check_shape(offsets, "offsets", "O*Hh", [orders * moduli.shape[1]])
    if moduli.numel() > 0 and has_data(moduli):
        _value_check("positive moduli", (moduli,), lambda: _check_moduli_values(moduli))
    check_multipliers(multipliers)


def _check_moduli_values(moduli):
    smallest = int(moduli.min())
    if smallest <= 0:
        raise ValueError(f"moduli must all be > 0, got {smallest}")


def check_table(table):
    check_float(table, "table")
    check_rank(table, 2, "table")


def check_table_device(table, ref, ref_name):
    """A table on another device than the output's (ref's) must be pinned host memory read by a CUDA
    kernel (or a GPU table read for CPU indices); a pageable host table cannot be read by the GPU."""
    if table.device == ref.device or ref.device.type != "cuda" or not has_data(table):
        return
    owner = ref_name + ("'" if ref_name.endswith("s") else "'s")
    if table.device.type != "cpu":
        raise ValueError(f"table must be on {owner} device {ref.device} or in pinned host memory, got {table.device}")
    if not table.is_pinned():
        raise ValueError(f"table must be on {owner} device {ref.device} or in pinned host memory, got a cpu tensor "
                         f"that is not pinned (use table.pin_memory())")


def check_rows_in_table(rows, num_rows, name):
    """Every row in [0, R): read from the values (an index outside is masked in the GPU kernels, but
    its output would be garbage)."""
    if rows.numel() > 0 and has_data(rows):
        _value_check(("rows in table", num_rows), (rows,), lambda: _check_row_values(rows, num_rows, name))


def _check_row_values(rows, num_rows, name):
    low, high = (int(v) for v in rows.aminmax())
    if low < 0 or high >= num_rows:
        raise ValueError(f"{name} must be in [0, R) = [0, {num_rows}), got {low if low < 0 else high}")


def check_spans_in_table(moduli, offsets, num_rows):
    """Hashed rows of table g lie in [offsets[g], offsets[g] + moduli[g]): checking the spans covers
    every id sequence, without hashing."""
    if offsets.numel() == 0 or not has_data(moduli, offsets):
        return
    _value_check(("spans in table", num_rows), (moduli, offsets), lambda: _check_span_values(moduli, offsets, num_rows))


def _check_span_values(moduli, offsets, num_rows):
    for g, (offset, modulus) in enumerate(zip(offsets.tolist(), moduli.flatten().tolist())):
        if offset < 0 or offset + modulus > num_rows:
            raise ValueError(f"hashed rows (offsets + hash mod moduli) must be in [0, R) = [0, {num_rows}): "
                             f"table {g} spans [{offset}, {offset + modulus})")


def check_gather(table, rows, sparse=False):
    check_table(table)
    check_dtype(rows, "rows", INT64)
    check_table_device(table, rows, "rows")
    check_rows_in_table(rows, table.shape[0], "rows")


def check_lookup(ids, table, multipliers, moduli, offsets, pad_id=0, sparse=False):
    check_hash(ids, multipliers, moduli, offsets, pad_id)
    check_table(table)
    check_table_device(table, ids, "ids")
    check_spans_in_table(moduli, offsets, table.shape[0])


def check_gather_backward(grad, rows, num_rows):
    check_float(grad, "grad")
    check_dtype(rows, "rows", INT64)
    if grad.dim() != rows.dim() + 1 or list(grad.shape[:-1]) != list(rows.shape):
        want = ", ".join([*(str(s) for s in rows.shape), "E"])
        raise ValueError(f"grad must have shape [*rows.shape, E] = [{want}], got {list(grad.shape)}")
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    check_rows_in_table(rows, num_rows, "rows")


# Fake impls (what torch.compile traces) -------------------------------------------------------------

@torch.library.register_fake(qualname("engram_hash"))
def _hash_fake(ids, multipliers, moduli, offsets, pad_id=0):
    check_hash(ids, multipliers, moduli, offsets, pad_id)
    return ids.new_empty(ids.shape[0], ids.shape[1], multipliers.shape[0] * moduli.shape[1])


@torch.library.register_fake(qualname("engram_gather"))
def _gather_fake(table, rows, sparse=False):
    check_gather(table, rows, sparse)
    return table.new_empty(*rows.shape, table.shape[1], device=rows.device)


@torch.library.register_fake(qualname("engram_lookup"))
def _lookup_fake(ids, table, multipliers, moduli, offsets, pad_id=0, sparse=False):
    check_lookup(ids, table, multipliers, moduli, offsets, pad_id, sparse)
    groups = multipliers.shape[0] * moduli.shape[1]
    return table.new_empty(ids.shape[0], ids.shape[1], groups * table.shape[1], device=ids.device)


@torch.library.register_fake(qualname("engram_gather_backward"))
def _gather_backward_fake(grad, rows, num_rows):
    check_gather_backward(grad, rows, num_rows)
    return grad.new_empty(num_rows, grad.shape[-1])


# CUDA: the Triton kernels ----------------------------------------------------------------------------

def _hash_cuda(ids, multipliers, moduli, offsets, pad_id=0):
    check_hash(ids, multipliers, moduli, offsets, pad_id)
    from ..kernels.engram import engram_hash

    return engram_hash(ids, multipliers, moduli, offsets, pad_id)


def _gather_cuda(table, rows, sparse=False):
    check_gather(table, rows, sparse)
    if rows.device.type != "cuda":  # CPU rows of a GPU table: gather where the table is
        return _gather_cuda(table, rows.to(table.device)).to(rows.device)
    from ..kernels.engram import engram_gather

    return engram_gather(table, rows)


def _lookup_cuda(ids, table, multipliers, moduli, offsets, pad_id=0, sparse=False):
    check_lookup(ids, table, multipliers, moduli, offsets, pad_id, sparse)
    if ids.device.type != "cuda":  # CPU ids of a GPU table
        on_table = [t.to(table.device) for t in (ids, multipliers, moduli, offsets)]
        return _lookup_cuda(on_table[0], table, *on_table[1:], pad_id).to(ids.device)
    from ..kernels.engram import engram_lookup

    return engram_lookup(ids, table, multipliers, moduli, offsets, pad_id)


def _gather_backward_cuda(grad, rows, num_rows):
    check_gather_backward(grad, rows, num_rows)
    from ..kernels.engram import engram_gather_backward

    return engram_gather_backward(grad, rows, num_rows)


register_cuda("engram_hash", _hash_cuda)
register_cuda("engram_gather", _gather_cuda)
register_cuda("engram_lookup", _lookup_cuda)
register_cuda("engram_gather_backward", _gather_backward_cuda)


# Autograd: the gradient of the table ---------------------------------------------------------------

def _table_grad(ctx, grad, rows):
    """dL/dtable from grad [*rows.shape, E], on the table's device."""
    num_rows, device = ctx.table_rows, ctx.table_device
    if ctx.sparse:  # as nn.Embedding(sparse=True): uncoalesced, one entry per gathered row
        width = grad.shape[-1]
        return torch.sparse_coo_tensor(rows.reshape(1, -1).to(device), grad.reshape(-1, width).to(device),
                                       (num_rows, width), check_invariants=False)  # rows were range-checked
    return op("engram_gather_backward")(grad, rows, num_rows).to(device)


def _remember_table(ctx, table, sparse):
    ctx.table_rows, ctx.table_width, ctx.table_device, ctx.sparse = *table.shape, table.device, sparse


def _gather_setup(ctx, inputs, output):
    table, rows, sparse = inputs
    ctx.save_for_backward(rows)
    _remember_table(ctx, table, sparse)


def _gather_grad(ctx, grad):
    (rows,) = ctx.saved_tensors
    return _table_grad(ctx, grad, rows), None, None


def _lookup_setup(ctx, inputs, output):
    ids, table, multipliers, moduli, offsets, pad_id, sparse = inputs
    ctx.save_for_backward(ids, multipliers, moduli, offsets)
    ctx.pad_id = pad_id
    _remember_table(ctx, table, sparse)


def _lookup_grad(ctx, grad):
    ids, multipliers, moduli, offsets = ctx.saved_tensors
    rows = op("engram_hash")(ids, multipliers, moduli, offsets, ctx.pad_id)  # recomputed: cheaper than stored
    if has_data(rows) and _passed_before(("spans in table", ctx.table_rows), (moduli, offsets)):
        _remember_passed(("rows in table", ctx.table_rows), (rows,))  # hashed into the checked spans
    return None, _table_grad(ctx, grad.reshape(*rows.shape, ctx.table_width), rows), None, None, None, None, None


torch.library.register_autograd(qualname("engram_gather"), _gather_grad, setup_context=_gather_setup)
torch.library.register_autograd(qualname("engram_lookup"), _lookup_grad, setup_context=_lookup_setup)


# Public functions ------------------------------------------------------------------------------------

@routable("engram_hash")
def engram_hash(ids, multipliers, moduli, offsets, pad_id=0):
    """Engram's hashed n-gram table rows: rows[b, t, o*Hh + h] = offsets[o*Hh + h] +
    (XOR_j ids[b, t - j] * multipliers[o, j]) mod moduli[o, h].

    ids: [B, L] (positions before the start read pad_id); multipliers: [O, Nmax], Nmax >= 1, odd in each
    order's leading entries and 0 after them; moduli: [O, Hh], every value > 0; offsets: [O*Hh]; all
    int64 on one device. Products wrap as int64; the modulo is non-negative. Returns rows [B, L, O*Hh]
    int64. No gradient (an index output).
    """
    return op("engram_hash")(ids, multipliers, moduli, offsets, pad_id)


@routable("engram_gather")
def engram_gather(table, rows, sparse=False):
    """Embedding rows of a table: emb[..., :] = table[rows[...]].

    table: [R, E], float16, bfloat16, float32 or float64, on rows' device or, for CUDA rows, in pinned
    host memory (read by the kernel over PCIe; a pageable host table is an error); rows: int64 of any
    shape, every value in [0, R) (checked: a ValueError, not a device-side assert). Returns
    [*rows.shape, E] in table's dtype on rows' device. Differentiable in table: a dense gradient
    (deterministic), or with sparse=True a sparse COO gradient (as nn.Embedding(sparse=True)).
    """
    return op("engram_gather")(table, rows, sparse)


@routable("engram_lookup")
def engram_lookup(ids, table, multipliers, moduli, offsets, pad_id=0, sparse=False):
    """Engram memory lookup, hash and gather fused: engram_gather(table, engram_hash(ids, multipliers,
    moduli, offsets, pad_id), sparse).flatten(-2).

    Arguments as engram_hash (ids [B, L], multipliers [O, Nmax], moduli [O, Hh] > 0, offsets [O*Hh], all
    int64 on one device) and engram_gather (table [R, E] floating, on ids' device or in pinned host
    memory); every table g must fit: 0 <= offsets[g] and offsets[g] + moduli[g] <= R (checked). Returns
    [B, L, O*Hh*E] in table's dtype on ids' device. Differentiable in table (a sparse gradient with
    sparse=True).
    """
    return op("engram_lookup")(ids, table, multipliers, moduli, offsets, pad_id, sparse)


class EngramLookupHandle:
    """An engram_lookup in flight on a side stream; wait() makes the current stream wait for it and
    returns the result (marked as used by the current stream, for the caching allocator)."""

    def __init__(self, result, event=None):
        self._result, self._event = result, event

    def wait(self):
        if self._event is not None:
            stream = torch.cuda.current_stream(self._result.device)
            stream.wait_event(self._event)
            self._result.record_stream(stream)
            self._event = None
        return self._result


_side_streams = {}


def engram_lookup_async(ids, table, multipliers, moduli, offsets, pad_id=0, sparse=False, stream=None):
    """engram_lookup issued on a side CUDA stream (`stream`, else one per device), so that it overlaps
    the compute queued after this call: issue layer l+1's lookup before layer l runs (the ids are known
    before the forward). The side stream first waits for the work queued so far (which made the ids).
    Returns an EngramLookupHandle; handle.wait() gives the [B, L, O*Hh*E] result. Differentiable as
    engram_lookup. On the CPU the lookup runs at once (wait() returns it).
    """
    if ids.device.type != "cuda":
        return EngramLookupHandle(engram_lookup(ids, table, multipliers, moduli, offsets, pad_id, sparse))
    if stream is None:  # one side stream per device, made once (not a fresh pool stream every call)
        if ids.device not in _side_streams:
            _side_streams[ids.device] = torch.cuda.Stream(ids.device)
        stream = _side_streams[ids.device]
    stream.wait_stream(torch.cuda.current_stream(ids.device))
    with torch.cuda.stream(stream):
        result = engram_lookup(ids, table, multipliers, moduli, offsets, pad_id, sparse)
        event = torch.cuda.Event()
        event.record(stream)
    for t in (ids, multipliers, moduli, offsets, table):
        if t.is_cuda:  # read on the side stream: not to be reused before it is done
            t.record_stream(stream)
    return EngramLookupHandle(result, event)

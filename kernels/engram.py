"""Triton Engram kernels (docs/ops.md §6): the n-gram hash, the row gather, the fused hash + gather,
and the dense table gradient.

The hash is int64 throughout: Triton's int64 multiply wraps (two's complement) and its `%` is C's
(the sign of the dividend), so a negative remainder is shifted by the modulus, as torch.remainder.

The gather moves whole rows: a program copies BLOCK_N rows x BLOCK_E columns, each row a contiguous
run that the compiler loads with 16-byte vectors when the row stride and width allow it (Triton
specialises integer arguments divisible by 16). The table may be a pinned host tensor: Triton's
launcher asks the driver for the device address of every pointer argument (cuPointerGetAttribute),
and pinned memory is device-accessible under unified addressing, so the kernel reads its rows over
PCIe directly, without a staging copy. Rows outside the table are masked (never read or written);
the ops check them on the host in eager mode.

Dense backward without float atomics: the flat rows are sorted (stable) with torch, then each run
of equal rows is summed by one program, in sorted order: the same bits on every run.
"""
import torch
import triton
import triton.language as tl

from .tuning import KernelConfigs, split_options


@triton.jit
def _ngram_mix(ids_ptr, p, t, in_range, order, multipliers_ptr, max_n, pad_id):
    """XOR_j ids[b, t - j] * multipliers[order, j] for positions p = b * L + t (int64, wrapping)."""
    mix = tl.zeros_like(p)
    for j in tl.range(0, max_n):
        multiplier = tl.load(multipliers_ptr + order * max_n + j)
        previous = tl.load(ids_ptr + p - j, mask=in_range & (t >= j), other=pad_id)
        mix = mix ^ (previous * multiplier)
    return mix


@triton.jit
def _table_row(mix, modulus, offset):
    """offset + (mix mod modulus), non-negative for modulus > 0."""
    r = mix % modulus
    return offset + tl.where(r < 0, r + modulus, r)


@triton.jit
def _positions(length, positions, BLOCK_T: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    return p, p % length, p < positions


@triton.jit
def engram_hash_kernel(ids_ptr, multipliers_ptr, moduli_ptr, offsets_ptr, rows_ptr, positions, length, max_n, heads,
                       pad_id, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """rows[p, o*Hh + h] for BLOCK_T positions p and every head h of order o = program_id(1)."""
    order = tl.program_id(1)
    p, t, in_range = _positions(length, positions, BLOCK_T)
    mix = _ngram_mix(ids_ptr, p, t, in_range, order, multipliers_ptr, max_n, pad_id)
    h = tl.arange(0, BLOCK_H)
    h_ok = h < heads
    group = order * heads + h
    modulus = tl.load(moduli_ptr + group, mask=h_ok, other=1)
    offset = tl.load(offsets_ptr + group, mask=h_ok, other=0)
    rows = _table_row(mix[:, None], modulus[None, :], offset[None, :])
    groups = tl.num_programs(1) * heads
    tl.store(rows_ptr + p[:, None] * groups + group[None, :], rows, mask=in_range[:, None] & h_ok[None, :])


@triton.jit
def _copy_rows(table_ptr, row, row_ok, out_ptr, out_offset, num_rows, row_stride, col_stride,
               WIDTH: tl.constexpr, BLOCK_E: tl.constexpr, ALIGN: tl.constexpr):
    """out[out_offset + e] = table[row, e] for one column block; rows outside the table are skipped.
    The width is a constexpr (one compile per row width, a model constant) and ALIGN (elements)
    divides every row start in the table and the output (the launcher's promise): together they let
    the compiler use 16-byte vectors for any width that allows them, e.g. 40-wide bf16 rows, which
    Triton's own specialisation (integer arguments divisible by 16) misses."""
    e = tl.program_id(2).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < WIDTH
    read = (row_ok & (row >= 0) & (row < num_rows))[:, None] & e_ok[None, :]
    src = tl.multiple_of(row * row_stride, ALIGN)
    dst = tl.multiple_of(out_offset, ALIGN)
    values = tl.load(table_ptr + src[:, None] + e[None, :] * col_stride, mask=read, other=0)
    tl.store(out_ptr + dst[:, None] + e[None, :], values, mask=row_ok[:, None] & e_ok[None, :])


@triton.jit
def engram_gather_kernel(table_ptr, rows_ptr, out_ptr, count, num_rows, row_stride, col_stride, WIDTH: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, ALIGN: tl.constexpr):
    """out[n, :] = table[rows[n], :] for BLOCK_N flat indices n (grid: n blocks, 1, column blocks)."""
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < count
    row = tl.load(rows_ptr + n, mask=n_ok, other=0)
    _copy_rows(table_ptr, row, n_ok, out_ptr, n * WIDTH, num_rows, row_stride, col_stride, WIDTH, BLOCK_E, ALIGN)


@triton.jit
def engram_lookup_kernel(ids_ptr, multipliers_ptr, moduli_ptr, offsets_ptr, table_ptr, out_ptr, positions, length,
                         max_n, heads, pad_id, num_rows, row_stride, col_stride, WIDTH: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, ALIGN: tl.constexpr):
    """out[p, g*E:(g+1)*E] = table[hash row of (p, g)] for BLOCK_N positions, group g = program_id(1):
    the hash is recomputed per program (Nmax int64 multiplies a position) instead of stored."""
    group = tl.program_id(1)
    p, t, in_range = _positions(length, positions, BLOCK_N)
    mix = _ngram_mix(ids_ptr, p, t, in_range, group // heads, multipliers_ptr, max_n, pad_id)
    row = _table_row(mix, tl.load(moduli_ptr + group), tl.load(offsets_ptr + group))
    out_offset = (p * tl.num_programs(1) + group) * WIDTH
    _copy_rows(table_ptr, row, in_range, out_ptr, out_offset, num_rows, row_stride, col_stride, WIDTH, BLOCK_E, ALIGN)


@triton.jit
def engram_gather_bwd_kernel(sorted_rows_ptr, order_ptr, grad_ptr, out_ptr, count, num_rows, width,
                             ACC: tl.constexpr, BLOCK_E: tl.constexpr):
    """The program at sorted position i that starts a run of equal rows sums the run's gradient rows
    (in sorted order) into out[row]; the others return."""
    i = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < width
    row = tl.load(sorted_rows_ptr + i)
    previous = tl.load(sorted_rows_ptr + i - 1, mask=i > 0, other=-1)
    if row != previous:
        acc = tl.zeros([BLOCK_E], dtype=ACC)
        j = i
        current = row
        while current == row:
            source = tl.load(order_ptr + j)
            acc += tl.load(grad_ptr + source * width + e, mask=e_ok, other=0).to(ACC)
            j += 1
            current = tl.load(sorted_rows_ptr + j, mask=j < count, other=-1)  # rows are >= 0: -1 ends the run
        ok = e_ok & (row >= 0) & (row < num_rows)
        tl.store(out_ptr + row * width + e, acc.to(out_ptr.dtype.element_ty), mask=ok)


# Launch configs ---------------------------------------------------------------------------------

def _padded_width(width):
    return max(triton.next_power_of_2(width), 16)


def _rows_heuristic(match):
    """About 4K elements a program (BLOCK_N rows, or positions of one group, x BLOCK_E columns), 4
    warps: enough bytes in flight per SM for a row gather (each row a contiguous run of E values)."""
    block_e = min(match["E"], 256)
    return dict(BLOCK_N=max(1, 4096 // block_e), BLOCK_E=block_e, num_warps=4)


def _rows_space(match):
    """Whole (padded) rows or 64-column slices (less masked padding for widths just past a power
    of two, e.g. 80), 1K-8K elements a program."""
    return [dict(BLOCK_N=max(1, n // block_e), BLOCK_E=block_e, num_warps=w)
            for block_e in sorted({min(match["E"], 256), min(match["E"], 64)})
            for n in (1024, 2048, 4096, 8192) for w in (2, 4, 8)]


def _rows_configs(name):
    return KernelConfigs(name, space=_rows_space, heuristic=_rows_heuristic, smallest=_rows_heuristic)


def _hash_heuristic(match):
    return dict(BLOCK_T=256, num_warps=4)


def _bwd_heuristic(match):
    """One program per sorted position and column block: a run's sum is one serial loop."""
    return dict(BLOCK_E=min(match["E"], 512), num_warps=1 if match["E"] <= 128 else 4)


GATHER = _rows_configs("engram_gather")
LOOKUP = _rows_configs("engram_lookup")
HASH = KernelConfigs("engram_hash", space=[dict(BLOCK_T=t, num_warps=w) for t in (128, 256, 512) for w in (2, 4)],
                     heuristic=_hash_heuristic, smallest=_hash_heuristic)
BWD = KernelConfigs("engram_gather_bwd", space=lambda m: [dict(BLOCK_E=min(m["E"], b), num_warps=w)
                                                            for b in (64, 128, 256, 512) for w in (1, 2, 4)],
                    heuristic=_bwd_heuristic, smallest=_bwd_heuristic)

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _row_alignment(table):
    """The largest power-of-two element count, up to 16 bytes, dividing the table's start, its row
    stride and its width (so every table row and output row starts on that boundary)."""
    if table.stride(1) != 1:
        return 1
    itemsize = table.element_size()
    align = 16 // itemsize
    while align > 1 and ((table.data_ptr() // itemsize) % align or table.stride(0) % align or table.shape[1] % align
                         or table.data_ptr() % itemsize):
        align //= 2
    return align


def _match(table_or_grad, width):
    return dict(dtype=DTYPE_NAMES[table_or_grad.dtype], E=_padded_width(width))


# Launchers (inputs checked by musetalk_fast/ops/engram.py) ----------------------------------------

def engram_hash(ids, multipliers, moduli, offsets, pad_id=0):
    batch, length = ids.shape
    orders, max_n = multipliers.shape
    heads = moduli.shape[1]
    rows = torch.empty(batch, length, orders * heads, dtype=torch.int64, device=ids.device)
    positions = batch * length
    if rows.numel() == 0:
        return rows
    args = (ids.contiguous(), multipliers.contiguous(), moduli.contiguous(), offsets.contiguous(), rows, positions,
            length, max_n, heads, pad_id)

    def run(config):
        constexprs, options = split_options(config)
        return engram_hash_kernel[(triton.cdiv(positions, config["BLOCK_T"]), orders)](
            *args, BLOCK_H=max(triton.next_power_of_2(heads), 2), **constexprs, **options)

    HASH.launch(run, ids.device, dict(heads=max(triton.next_power_of_2(heads), 2)))
    return rows


def engram_gather(table, rows):
    """table: [R, E] on rows' device or pinned host memory; returns [*rows.shape, E] on rows' device."""
    width = table.shape[1]
    out = torch.empty(*rows.shape, width, dtype=table.dtype, device=rows.device)
    count = rows.numel()
    if out.numel() == 0:
        return out
    flat = rows.reshape(-1).contiguous()

    def run(config):
        constexprs, options = split_options(config)
        grid = (triton.cdiv(count, config["BLOCK_N"]), 1, triton.cdiv(width, config["BLOCK_E"]))
        return engram_gather_kernel[grid](table, flat, out, count, table.shape[0], table.stride(0), table.stride(1),
                                   WIDTH=width, ALIGN=_row_alignment(table), **constexprs, **options)

    GATHER.launch(run, rows.device, _match(table, width))
    return out


def engram_lookup(ids, table, multipliers, moduli, offsets, pad_id=0):
    """Returns [B, L, G*E] on ids' device; the hashed rows never reach memory."""
    batch, length = ids.shape
    orders, max_n = multipliers.shape
    heads = moduli.shape[1]
    groups, width = orders * heads, table.shape[1]
    out = torch.empty(batch, length, groups * width, dtype=table.dtype, device=ids.device)
    positions = batch * length
    if out.numel() == 0:
        return out

    def run(config):
        constexprs, options = split_options(config)
        grid = (triton.cdiv(positions, config["BLOCK_N"]), groups, triton.cdiv(width, config["BLOCK_E"]))
        return engram_lookup_kernel[grid](ids.contiguous(), multipliers.contiguous(), moduli.contiguous(),
                                   offsets.contiguous(), table, out, positions, length, max_n, heads, pad_id,
                                   table.shape[0], table.stride(0), table.stride(1),
                                   WIDTH=width, ALIGN=_row_alignment(table), **constexprs, **options)

    LOOKUP.launch(run, ids.device, _match(table, width))
    return out


def engram_gather_backward(grad, rows, num_rows):
    """The dense table gradient [num_rows, E] in grad's dtype, on grad's device."""
    width = grad.shape[-1]
    out = torch.zeros(num_rows, width, dtype=grad.dtype, device=grad.device)
    count = rows.numel()
    if count == 0 or width == 0:
        return out
    sorted_rows, order = torch.sort(rows.reshape(-1), stable=True)
    flat_grad = grad.reshape(count, width).contiguous()
    acc = tl.float64 if grad.dtype == torch.float64 else tl.float32

    def run(config):
        constexprs, options = split_options(config)
        return engram_gather_bwd_kernel[(count, triton.cdiv(width, config["BLOCK_E"]))](
            sorted_rows, order, flat_grad, out, count, num_rows, width, ACC=acc, **constexprs, **options)

    BWD.launch(run, grad.device, _match(grad, width))
    return out

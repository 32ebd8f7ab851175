"""Triton top-k: a radix select per row, and the fused lightning-indexer top-k.

Keys: a float maps to an unsigned integer of its width whose order is the float order (flip every bit
of a negative, the sign bit of a positive). The k-th largest key is found 8 bits at a time from the top
(radix select): a 256-bin histogram of the next digit of the keys that match the digits found so far
gives the digit at which the count from the top reaches k. Then the keys above the threshold are all
taken and the ties at it fill the rest, in index order. Valid: finite and inside [ks, ke); a row with
k or fewer valid keys takes them all and is -1-padded.

topk_indices: one program per row, the row read in chunks (KEY_BITS / 8 histogram passes, then two
writing passes), so any row length and any k.

lightning_indexer_topk: a program computes the logits of BLOCK_T queries one key tile at a time (the
indexer's tile math, kernels/lightning_indexer.py) and keeps, per query, a candidate buffer of CAP >=
k + BLOCK_S (value, index) pairs in global memory, twice (O(T * k) in all). A tile appends its logits above
the query's threshold; when a query's buffer would overflow, its top k are selected into the other buffer
(the same radix select, in chunks) and the threshold becomes the k-th value. The [T, S] logits never exist.
"""
import torch
import triton
import triton.language as tl

from .lightning_indexer import DTYPE_NAMES, _acc, _dot_precision, _indexer_tile, _key_range, _match, _query_block
from .lightning_indexer import prepare_inputs
from .tuning import KernelConfigs, split_options


@triton.jit
def _order_key(x, IS_FP64: tl.constexpr):
    """An unsigned key with the order of the float x (float32, or float64)."""
    if IS_FP64:
        bits = x.to(tl.int64, bitcast=True)
        flip = (bits >> 63) | (tl.full(bits.shape, 1, tl.int64) << 63)
        return (bits ^ flip).to(tl.uint64, bitcast=True)
    else:
        bits = x.to(tl.int32, bitcast=True)
        flip = (bits >> 31) | (tl.full(bits.shape, 1, tl.int32) << 31)
        return (bits ^ flip).to(tl.uint32, bitcast=True)


@triton.jit
def _is_valid(x):
    return (x == x) & (tl.abs(x) != float("inf"))  # finite: not NaN, not +-inf


@triton.jit
def _pick_digit(hist, remaining):
    """One radix step: the digit d of the remaining-th largest key among those counted in hist [256] (the
    largest d with count(digit >= d) >= remaining), and how many of them lie strictly above d."""
    digits = tl.arange(0, 256)
    at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    digit = tl.max(tl.where(at_or_above >= remaining, digits, 0), axis=0)
    return digit, tl.sum(tl.where(digits > digit, hist, 0), axis=0)


@triton.jit
def _kth_key(val_ptr, lo, hi, k, IS_FP64: tl.constexpr, KEY_BITS: tl.constexpr, CHUNK: tl.constexpr):
    """The key of the k-th largest valid value of val_ptr[lo:hi], 8 bits per pass over it (a 256-bin
    histogram of the next digit of the keys that match the digits found so far); 0 (every valid key
    is taken) when there are k or fewer."""
    key_type = tl.uint64 if IS_FP64 else tl.uint32
    prefix = tl.full((), 0, key_type)
    remaining = k
    valid_count = 0
    for step in tl.static_range(KEY_BITS // 8):
        shift = KEY_BITS - 8 * (step + 1)
        hist = tl.zeros((256,), dtype=tl.int32)
        for start in tl.range(lo, hi, CHUNK):
            cols = start + tl.arange(0, CHUNK)
            x = tl.load(val_ptr + cols, mask=cols < hi, other=float("nan"))
            key = _order_key(x, IS_FP64)
            match = _is_valid(x)
            if step > 0:
                match = match & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
            hist += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=match)
        if step == 0:
            valid_count = tl.sum(hist, axis=0)
        digit, above = _pick_digit(hist, remaining)
        prefix = prefix | (digit.to(key_type) << shift)
        remaining -= above
    return tl.where(valid_count > k, prefix, 0)


@triton.jit
def _write_top(val_ptr, idx_ptr, lo, hi, prefix, k, out_idx_ptr, out_val_ptr, IS_FP64: tl.constexpr,
               FROM_BUFFER: tl.constexpr, WRITE_VALUES: tl.constexpr, CHUNK: tl.constexpr):
    """Write the indices of val_ptr[lo:hi]'s valid values whose key is above prefix, then of those equal
    to it in index order until k, to out_idx_ptr[0:k]: idx_ptr[i] when FROM_BUFFER, else i; with
    WRITE_VALUES the values too, to out_val_ptr. Returns the smallest value written."""
    written = 0
    smallest = tl.full((), float("inf"), val_ptr.dtype.element_ty)
    for ties in tl.static_range(2):  # pass 0: above the threshold; pass 1: ties at it
        for start in tl.range(lo, hi, CHUNK):
            cols = start + tl.arange(0, CHUNK)
            x = tl.load(val_ptr + cols, mask=cols < hi, other=float("nan"))
            key = _order_key(x, IS_FP64)
            if ties == 0:
                take = _is_valid(x) & (key > prefix)
            else:
                take = _is_valid(x) & (key == prefix)
            position = written + tl.cumsum(take.to(tl.int32), axis=0) - 1
            if ties == 1:
                take = take & (position < k)
            if FROM_BUFFER:
                tl.store(out_idx_ptr + position, tl.load(idx_ptr + cols, mask=take, other=-1), mask=take)
            else:
                tl.store(out_idx_ptr + position, cols, mask=take)
            if WRITE_VALUES:
                tl.store(out_val_ptr + position, x, mask=take)
            smallest = tl.minimum(smallest, tl.min(tl.where(take, x, float("inf")), axis=0))
            written += tl.sum(take.to(tl.int32), axis=0)
    return smallest


@triton.jit
def topk_indices_kernel(logits_ptr, ks_ptr, ke_ptr, out_ptr, S, k, stride_row,
                        HAS_KS: tl.constexpr, HAS_KE: tl.constexpr, IS_FP64: tl.constexpr,
                        KEY_BITS: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0)
    lo = 0
    hi = S
    if HAS_KS:
        lo = tl.load(ks_ptr + row)
    if HAS_KE:
        hi = tl.load(ke_ptr + row)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    prefix = _kth_key(row_ptr, lo, hi, k, IS_FP64, KEY_BITS, CHUNK)
    # Everything above the threshold, then ties at it in index order until k.
    _write_top(row_ptr, row_ptr, lo, hi, prefix, k, out_ptr + row.to(tl.int64) * k, row_ptr, IS_FP64, False, False,
               CHUNK)


@triton.jit
def _row_value(vector, rows_local, r):
    """vector[r] of a [BLOCK_T] vector, as a scalar."""
    return tl.sum(tl.where(rows_local == r, vector, 0), axis=0)


@triton.jit
def lightning_indexer_topk_kernel(q_ptr, k_ptr, k_scale_ptr, w_ptr, ks_ptr, ke_ptr, buf_val_ptr, buf_idx_ptr, out_ptr,
                                  T, S, H, stride_qt, stride_qh, stride_k, stride_wt, topk,
                                  HP: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
                                  CAP: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                  IS_FP64: tl.constexpr, KEY_BITS: tl.constexpr, CHUNK: tl.constexpr):
    """Each query's candidates live in one half of its two CAP-slot buffers ([T, 2, CAP]); a compaction
    selects the top k of the full half into the other (radix select over the buffer in CHUNKs: a few
    values per thread, where selecting over all CAP slots at once held them all in registers)."""
    pid_t = tl.program_id(0)
    rows, lo, hi, block_lo, block_hi = _key_range(ks_ptr, ke_ptr, pid_t, T, S, BLOCK_T)
    q, w, _ = _query_block(q_ptr, w_ptr, pid_t, 0, T, H, stride_qt, stride_qh, stride_wt, HP, D, BLOCK_T, ACC)
    rows_local = tl.arange(0, BLOCK_T)
    count = tl.zeros((BLOCK_T,), dtype=tl.int32)
    half = tl.zeros((BLOCK_T,), dtype=tl.int32)  # which of the query's two buffers holds its candidates
    threshold = tl.full((BLOCK_T,), float("-inf"), ACC)
    for start in tl.range((block_lo // BLOCK_S) * BLOCK_S, block_hi, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        logits = _indexer_tile(q, w, k_ptr, k_scale_ptr, cols, S, stride_k, lo, hi,
                               HP, D, BLOCK_T, BLOCK_S, ACC, DOT_PRECISION)
        take = _is_valid(logits) & (logits > threshold[:, None])
        if tl.max(count + tl.sum(take.to(tl.int32), axis=1), axis=0) > CAP:
            # Compact every query's buffer to its top k; the k-th value becomes its threshold.
            tl.debug_barrier()
            for r in tl.range(0, BLOCK_T):
                filled = _row_value(count, rows_local, r)
                if filled > topk:
                    source = _row_value(half, rows_local, r)
                    row_base = (pid_t * BLOCK_T + r).to(tl.int64) * (2 * CAP)
                    src, dst = row_base + source * CAP, row_base + (1 - source) * CAP
                    prefix = _kth_key(buf_val_ptr + src, 0, filled, topk, IS_FP64, KEY_BITS, CHUNK)
                    kth_value = _write_top(buf_val_ptr + src, buf_idx_ptr + src, 0, filled, prefix, topk,
                                           buf_idx_ptr + dst, buf_val_ptr + dst, IS_FP64, True, True, CHUNK)
                    count = tl.where(rows_local == r, topk, count)
                    half = tl.where(rows_local == r, 1 - source, half)
                    threshold = tl.where(rows_local == r, kth_value, threshold)
            tl.debug_barrier()
            take = _is_valid(logits) & (logits > threshold[:, None])
        position = rows.to(tl.int64)[:, None] * (2 * CAP) + (half * CAP + count)[:, None] + \
            tl.cumsum(take.to(tl.int32), axis=1) - 1
        tl.store(buf_val_ptr + position, logits, mask=take & (rows < T)[:, None])
        tl.store(buf_idx_ptr + position, tl.broadcast_to(cols[None, :], (BLOCK_T, BLOCK_S)),
                 mask=take & (rows < T)[:, None])
        count += tl.sum(take.to(tl.int32), axis=1)
    tl.debug_barrier()
    # Each query's top k from its buffer (all of it when it holds k or fewer).
    for r in tl.range(0, BLOCK_T):
        row = pid_t * BLOCK_T + r
        if row < T:
            filled = _row_value(count, rows_local, r)
            src = row.to(tl.int64) * (2 * CAP) + _row_value(half, rows_local, r) * CAP
            prefix = _kth_key(buf_val_ptr + src, 0, filled, topk, IS_FP64, KEY_BITS, CHUNK)
            _write_top(buf_val_ptr + src, buf_idx_ptr + src, 0, filled, prefix, topk,
                       out_ptr + row.to(tl.int64) * topk, buf_val_ptr + src, IS_FP64, True, False, CHUNK)


# Launch configs --------------------------------------------------------------------------------

# A row streams in chunks of 4096 keys over 8 warps (16 keys per thread per pass); the interpreter takes 64.
TOPK = KernelConfigs("topk_indices",
                     space=[dict(CHUNK=c, num_warps=w) for c in (1024, 2048, 4096, 8192) for w in (4, 8, 16)],
                     heuristic=lambda match: dict(CHUNK=4096, num_warps=8),
                     smallest=lambda match: dict(CHUNK=64, num_warps=4))


def _fused_heuristic(match):
    """The indexer's tile shape: ~128 (query, head) rows, key tiles of 64; the compaction's radix select
    reads the buffer in chunks of 1024 (4 values a thread at 8 warps). No stack frame at fp8/bf16/fp16
    (sm_90 compile report; 128-key tiles have one).
    fp32 and fp64 (FMA and DMMA matmuls) compact in chunks of 256 (one value a thread): at 1024 their
    kernels needed a little over 128 registers and ptxas held them to 128, spilling 24-216 B (sm_90
    report). fp32 takes 32 rows, fp64 64 (at 32 rows ptxas still held fp64 to 128 registers and spilled
    8-200 B; at 64 it takes 150-200 registers, no stack)."""
    if match["dtype"] not in ("fp8", "bf16", "fp16"):
        hp = match["HP"]
        if match["dtype"] == "fp32":
            return dict(BLOCK_T=max(1, 32 // hp), BLOCK_S=32 if hp <= 32 else 16, CHUNK=256, num_warps=8, num_stages=1)
        return dict(BLOCK_T=max(1, 64 // hp), BLOCK_S=32, CHUNK=256, num_warps=8, num_stages=1)
    return dict(BLOCK_T=max(1, 128 // match["HP"]), BLOCK_S=64, CHUNK=1024, num_warps=8, num_stages=2)


FUSED = KernelConfigs("lightning_indexer_topk",
                      space=lambda match: [dict(BLOCK_T=max(1, r // match["HP"]), BLOCK_S=s, CHUNK=1024, num_warps=w,
                                                num_stages=st)
                                           for r in (64, 128) if r >= match["HP"] for s in (32, 64, 128)
                                           for w in (4, 8) for st in (1, 2)],
                      heuristic=_fused_heuristic,
                      smallest=lambda match: dict(BLOCK_T=max(1, 16 // match["HP"]), BLOCK_S=16, CHUNK=64, num_warps=4,
                                                  num_stages=1))


def _key_bits(dtype):
    return 64 if dtype == torch.float64 else 32


def topk_indices(logits, k, ks=None, ke=None, sorted=False):
    num_rows, num_keys = logits.shape
    out = torch.full((num_rows, k), -1, dtype=torch.int32, device=logits.device)
    if num_rows == 0 or num_keys == 0 or k == 0:
        return out
    if logits.dtype in (torch.float16, torch.bfloat16):  # widened exactly (the indexer's logits are float32)
        logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    dummy = out  # an int32 pointer for an absent ks/ke (never read)

    def run(config):
        constexprs, options = split_options(config)
        return topk_indices_kernel[(num_rows,)](logits, dummy if ks is None else ks.contiguous(),
                                         dummy if ke is None else ke.contiguous(), out, num_keys, k,
                                         logits.stride(0), HAS_KS=ks is not None, HAS_KE=ke is not None,
                                         IS_FP64=logits.dtype == torch.float64, KEY_BITS=_key_bits(logits.dtype),
                                         **constexprs, **options)

    TOPK.launch(run, logits.device, dict(dtype=DTYPE_NAMES[logits.dtype]), dict(S=num_keys))
    return sort_by_value(out, logits) if sorted else out


def sort_by_value(indices, logits):
    """Each row's indices by decreasing logit, the -1 padding last."""
    values = logits.gather(1, indices.clamp_min(0).long()).to(torch.float64 if logits.dtype == torch.float64
                                                              else torch.float32)
    values = values.masked_fill(indices < 0, float("-inf"))
    order = values.sort(dim=1, descending=True, stable=True).indices
    return indices.gather(1, order)


def lightning_indexer_topk(q, k, k_scale, weights, ks, ke, topk):
    q, k, k_scale, weights, ks, ke, acc = prepare_inputs(q, k, k_scale, weights, ks, ke)
    T, H, D = q.shape
    S = k.shape[0]
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    if T == 0 or S == 0 or topk == 0:
        return out
    match = _match(q, H)

    def run(config):
        constexprs, options = split_options(config)
        cap = triton.next_power_of_2(topk + config["BLOCK_S"])
        buf_val = torch.empty((T, 2, cap), dtype=acc, device=q.device)
        buf_idx = torch.empty((T, 2, cap), dtype=torch.int32, device=q.device)
        return lightning_indexer_topk_kernel[(triton.cdiv(T, config["BLOCK_T"]),)](
            q, k, k_scale, weights, ks, ke, buf_val, buf_idx, out, T, S, H, q.stride(0), q.stride(1), k.stride(0),
            weights.stride(0), topk, HP=match["HP"], D=D, CAP=cap, ACC=_acc(acc),
            DOT_PRECISION=_dot_precision(q.dtype), IS_FP64=acc == torch.float64, KEY_BITS=_key_bits(acc),
            **constexprs, **options)

    FUSED.launch(run, q.device, dict(match, k=triton.next_power_of_2(topk)), dict(S=S))
    return out

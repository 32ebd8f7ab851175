"""Triton sigmoid-gated SDPA (Qwen gated attention G1), forward and backward.

Forward: FlashAttention-2 online softmax over key blocks; the epilogue multiplies the normalised
output by sigmoid(gate) before its one store, and saves the row log-sum-exp.
Backward (docs/ops.md §4): with Y = O * s, s = sigmoid(gate), no pre-gate O is needed:
    dO = dY * s,   rowsum(dO * O) = rowsum(dY * Y),   dgate = dY * Y * (1 - s).
A small pass computes delta = rowsum(dY * Y) and dgate; then one kernel accumulates dK, dV per
key block (looping over the Hq/Hkv query heads of its KV head, so GQA needs no atomics) and one
accumulates dQ per query block, both recomputing P = exp(S - lse) and dO on the fly.

Layouts: any strides (the [B, L, H, D].transpose(1, 2) view runs without a copy); a head-wise
gate [B, H, L, 1] is read through a stride-0 expand. Causal masking is top-left (key s <= query l).
"""
import torch
import triton
import triton.language as tl

from .tuning import KernelConfigs, split_options

LOG2E = 1.4426950408889634
LOG2E_ = tl.constexpr(LOG2E)  # the same constant inside kernels


def _attention_space(shapes, warps, stages):
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n in shapes for w in warps for st in stages]


def _element_bytes(match):
    return {"fp64": 8, "fp32": 4}.get(match["dtype"], 2)


def _attention_heuristic(fast_config):
    """fast_config(match) for 2-byte dtypes; float64 (the exact path, FMA not tensor cores) takes small
    tiles. KernelConfigs shrinks either to the GPU's shared memory."""
    def heuristic(match):
        if match["dtype"] == "fp64":
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
        return fast_config(match)

    return heuristic


def _smallest(match):
    return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)


# Search spaces the tuner times (bench/tune.py), heuristics for keys no table has, and shared-memory
# estimates: tiles resident for the whole loop plus `num_stages` copies of the pipelined ones.
# The heuristics' 2-byte configs are the H100's autotuned winners at B4 H16 L4096 D128 bf16.
FWD = KernelConfigs(
    "gated_attention_fwd",
    space=_attention_space([(128, 64), (128, 128), (64, 64), (128, 32)], (4, 8), (2, 3, 4)),
    heuristic=_attention_heuristic(lambda match: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
                                   if match["causal"] else dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)),
    smallest=_smallest,
    shared=lambda c, match: (c["BLOCK_M"] + 2 * c["num_stages"] * c["BLOCK_N"]) * match["D"] * _element_bytes(match),
)
DKDV = KernelConfigs(
    "gated_attention_bwd_dkdv",
    space=_attention_space([(32, 128), (64, 128), (64, 64), (32, 64)], (4, 8), (2, 3)),
    heuristic=_attention_heuristic(lambda match: dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3)),
    smallest=_smallest,
    shared=lambda c, match: (2 * c["BLOCK_N"] + 3 * c["num_stages"] * c["BLOCK_M"]) * match["D"] * _element_bytes(match),
)
DQ = KernelConfigs(
    "gated_attention_bwd_dq",
    space=_attention_space([(128, 32), (128, 64), (64, 64), (64, 32)], (4, 8), (2, 3)),
    heuristic=_attention_heuristic(lambda match: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)),
    smallest=_smallest,
    shared=lambda c, match: (3 * c["BLOCK_M"] + 2 * c["num_stages"] * c["BLOCK_N"]) * match["D"] * _element_bytes(match),
)
PREPROCESS = KernelConfigs(
    "gated_attention_bwd_preprocess",
    space=[dict(BLOCK_M=m, num_warps=w) for m in (32, 64, 128) for w in (4, 8)],
    heuristic=lambda match: dict(BLOCK_M=64, num_warps=4),
    smallest=lambda match: dict(BLOCK_M=16, num_warps=4),
)


@triton.jit
def _load_tile(base, rows, n_rows, stride_row, stride_d, dims,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """A [len(rows), BLOCK_D] tile, zero past n_rows and HEAD_DIM. Bounds checks only where needed:
    CHECK_ROWS is off for blocks known to be in range, and the D check vanishes when BLOCK_D == D."""
    ptrs = base + rows[:, None] * stride_row + dims[None, :] * stride_d
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(dims < HEAD_DIM)[None, :], other=0.0)
    return tile


@triton.jit
def _store_tile(base, rows, n_rows, dims, value, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store into a contiguous [n_rows, HEAD_DIM] matrix."""
    ptrs = base + rows[:, None] * HEAD_DIM + dims[None, :]
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, value, mask=(rows < n_rows)[:, None])
    else:
        tl.store(ptrs, value, mask=(rows < n_rows)[:, None] & (dims < HEAD_DIM)[None, :])


@triton.jit
def _key_block(q, k_base, v_base, sk_s, sk_d, sv_s, sv_d, rows, dims, start_n, S, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """The key block at start_n: (k, v, base-2 scores [BLOCK_M, BLOCK_N]), scores -inf where masked."""
    keys = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(k_base, keys, S, sk_s, sk_d, dims, HEAD_DIM, BLOCK_D, MASKED)
    v = _load_tile(v_base, keys, S, sv_s, sv_d, dims, HEAD_DIM, BLOCK_D, MASKED)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        allowed = (keys < S)[None, :]
        if IS_CAUSAL:
            allowed = allowed & (keys[None, :] <= rows[:, None])
        scores = tl.where(allowed, scores, float("-inf"))
    return k, v, scores


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sk_s, sk_d, sv_s, sv_d, rows, dims, lo, hi, S, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax over key blocks [lo, hi): FlashAttention-2's running max m_i and sum l_i."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        k, v, scores = _key_block(q, k_base, v_base, sk_s, sk_d, sv_s, sv_d, rows, dims, start_n, S, qk_scale,
                                  HEAD_DIM, BLOCK_D, IS_CAUSAL, DOT_PRECISION, BLOCK_N, MASKED)
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        if MASKED:
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        else:
            m_new_safe = m_new
        p = tl.math.exp2(scores - m_new_safe[:, None])
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_ranges(start_m, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """For the query block at start_m: key blocks [0, full_hi) need no mask (in range, and before the
    causal diagonal); [full_hi, hi) are masked; keys past hi are invisible (top-left causal)."""
    if IS_CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M)
        full_hi = (tl.minimum(S, start_m + 1) // BLOCK_N) * BLOCK_N
    else:
        hi = S
        full_hi = (S // BLOCK_N) * BLOCK_N
    return full_hi, hi


@triton.jit
def gated_attention_fwd_kernel(
    Q, K, V, G, Out, Lse,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sv_b, sv_h, sv_s, sv_d,
    sg_b, sg_h, sg_l, sg_d,
    H, L, S, GROUP, qk_scale,  # qk_scale = scale * log2(e): the softmax runs in base 2
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr, HAS_GATE: tl.constexpr = True,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit base offsets: tensors may pass 2^31 elements
    b = pid_bh // H
    h = pid_bh % H
    kv_h = h // GROUP
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * sq_b + h * sq_h, rows, L, sq_l, sq_d, dims, HEAD_DIM, BLOCK_D, True)
    k_base = K + b * sk_b + kv_h * sk_h
    v_base = V + b * sv_b + kv_h * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    full_hi, hi = _key_ranges(start_m, S, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sk_s, sk_d, sv_s, sv_d, rows, dims, 0, full_hi,
                               S, qk_scale, HEAD_DIM, BLOCK_D, IS_CAUSAL, DOT_PRECISION, BLOCK_N, False)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sk_s, sk_d, sv_s, sv_d, rows, dims, full_hi, hi,
                               S, qk_scale, HEAD_DIM, BLOCK_D, IS_CAUSAL, DOT_PRECISION, BLOCK_N, True)

    # Epilogue: normalise, gate, store once. A row with no key (S = 0) gives 0 and lse = -inf.
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if HAS_GATE:
        gate = _load_tile(G + b * sg_b + h * sg_h, rows, L, sg_l, sg_d, dims, HEAD_DIM, BLOCK_D, True)
        out = out * tl.sigmoid(gate.to(ACC))
    _store_tile(Out + pid_bh * L * HEAD_DIM, rows, L, dims, out.to(Out.dtype.element_ty), HEAD_DIM, BLOCK_D)
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) / LOG2E_, float("-inf"))
    tl.store(Lse + pid_bh * L + rows, lse, mask=rows < L)


@triton.jit
def gated_attention_bwd_preprocess_kernel(
    dY, Y, G, Delta, dG,
    sdy_b, sdy_h, sdy_l, sdy_d,
    sg_b, sg_h, sg_l, sg_d,
    H, L,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_WISE_GATE: tl.constexpr, BLOCK_M: tl.constexpr,
    ACC: tl.constexpr,
):
    """delta = rowsum(dY * Y); dgate = dY * Y * (1 - sigmoid(gate)), summed over D if head-wise."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit base offsets: tensors may pass 2^31 elements
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dy = _load_tile(dY + b * sdy_b + h * sdy_h, rows, L, sdy_l, sdy_d, dims, HEAD_DIM, BLOCK_D, True)
    y = _load_tile(Y + pid_bh * L * HEAD_DIM, rows, L, HEAD_DIM, 1, dims, HEAD_DIM, BLOCK_D, True)
    gate = _load_tile(G + b * sg_b + h * sg_h, rows, L, sg_l, sg_d, dims, HEAD_DIM, BLOCK_D, True)
    dy_y = dy.to(ACC) * y.to(ACC)
    tl.store(Delta + pid_bh * L + rows, tl.sum(dy_y, axis=1), mask=rows < L)
    dgate = dy_y * (1.0 - tl.sigmoid(gate.to(ACC)))
    if HEAD_WISE_GATE:
        tl.store(dG + pid_bh * L + rows, tl.sum(dgate, axis=1).to(dG.dtype.element_ty), mask=rows < L)
    else:
        _store_tile(dG + pid_bh * L * HEAD_DIM, rows, L, dims, dgate.to(dG.dtype.element_ty), HEAD_DIM, BLOCK_D)


@triton.jit
def _dkdv_inner(dk, dv, k, v, keys, q_base, dy_base, g_base, lse_base, delta_base,
                sq_l, sq_d, sdy_l, sdy_d, sg_l, sg_d, dims, lo, hi, L, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr):
    """Accumulate one query head's query blocks [lo, hi) into the key block's dK, dV."""
    for start_m in tl.range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, rows, L, sq_l, sq_d, dims, HEAD_DIM, BLOCK_D, MASKED)
        dy = _load_tile(dy_base, rows, L, sdy_l, sdy_d, dims, HEAD_DIM, BLOCK_D, MASKED)
        gate = _load_tile(g_base, rows, L, sg_l, sg_d, dims, HEAD_DIM, BLOCK_D, MASKED)
        d_out = (dy.to(ACC) * tl.sigmoid(gate.to(ACC))).to(q.dtype)  # dO = dY * s
        if MASKED:
            lse = tl.load(lse_base + rows, mask=rows < L, other=0.0)
            delta = tl.load(delta_base + rows, mask=rows < L, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(scores_t - lse[None, :] * LOG2E_)
        if MASKED:
            allowed = (rows < L)[None, :]
            if IS_CAUSAL:
                allowed = allowed & (keys[:, None] <= rows[None, :])
            p_t = tl.where(allowed, p_t, 0.0)
        dv += tl.dot(p_t.to(q.dtype), d_out, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(d_out), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])  # softmax backward: dS = P * (dP - rowsum(dO * O))
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def gated_attention_bwd_dkdv_kernel(
    Q, K, V, G, dY, Lse, Delta, dK, dV,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sv_b, sv_h, sv_s, sv_d,
    sg_b, sg_h, sg_l, sg_d,
    sdy_b, sdy_h, sdy_l, sdy_d,
    H, H_KV, L, S, GROUP, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """dV = sum P^T dO and dK = scale * sum dS^T Q over the group's query heads, per key block."""
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1).to(tl.int64)  # 64-bit base offsets: tensors may pass 2^31 elements
    b = pid_bkv // H_KV
    kv_h = pid_bkv % H_KV
    start_n = pid_n * BLOCK_N
    keys = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * sk_b + kv_h * sk_h, keys, S, sk_s, sk_d, dims, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V + b * sv_b + kv_h * sv_h, keys, S, sv_s, sv_d, dims, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    # Query blocks: [lo, mid) masked (causal diagonal), [mid, full_hi) unmasked, [tail, L) masked
    # (ragged end). Queries before lo see none of these keys (top-left causal).
    full_hi = (L // BLOCK_M) * BLOCK_M
    lo = 0
    mid = 0
    if IS_CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        first_unmasked = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M
        mid = tl.maximum(lo, tl.minimum(first_unmasked, full_hi))
    tail = tl.maximum(mid, full_hi)
    for g in range(GROUP):
        h = kv_h * GROUP + g
        bh = b * H + h
        q_base = Q + b * sq_b + h * sq_h
        dy_base = dY + b * sdy_b + h * sdy_h
        g_base = G + b * sg_b + h * sg_h
        dk, dv = _dkdv_inner(dk, dv, k, v, keys, q_base, dy_base, g_base, Lse + bh * L, Delta + bh * L,
                             sq_l, sq_d, sdy_l, sdy_d, sg_l, sg_d, dims, lo, mid, L, qk_scale,
                             HEAD_DIM, BLOCK_D, IS_CAUSAL, DOT_PRECISION, BLOCK_M, True, ACC)
        dk, dv = _dkdv_inner(dk, dv, k, v, keys, q_base, dy_base, g_base, Lse + bh * L, Delta + bh * L,
                             sq_l, sq_d, sdy_l, sdy_d, sg_l, sg_d, dims, mid, full_hi, L, qk_scale,
                             HEAD_DIM, BLOCK_D, IS_CAUSAL, DOT_PRECISION, BLOCK_M, False, ACC)
        dk, dv = _dkdv_inner(dk, dv, k, v, keys, q_base, dy_base, g_base, Lse + bh * L, Delta + bh * L,
                             sq_l, sq_d, sdy_l, sdy_d, sg_l, sg_d, dims, tail, L, L, qk_scale,
                             HEAD_DIM, BLOCK_D, IS_CAUSAL, DOT_PRECISION, BLOCK_M, True, ACC)
    _store_tile(dK + pid_bkv * S * HEAD_DIM, keys, S, dims, (dk * scale).to(dK.dtype.element_ty), HEAD_DIM, BLOCK_D)
    _store_tile(dV + pid_bkv * S * HEAD_DIM, keys, S, dims, dv.to(dV.dtype.element_ty), HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_inner(dq, q, d_out, lse, delta, k_base, v_base, sk_s, sk_d, sv_s, sv_d, rows, dims, lo, hi, S, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate key blocks [lo, hi) into the query block's dQ (unscaled)."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        k, v, scores = _key_block(q, k_base, v_base, sk_s, sk_d, sv_s, sv_d, rows, dims, start_n, S, qk_scale,
                                  HEAD_DIM, BLOCK_D, IS_CAUSAL, DOT_PRECISION, BLOCK_N, MASKED)
        p = tl.math.exp2(scores - lse[:, None])  # masked scores are -inf: p = 0 there
        dp = tl.dot(d_out, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def gated_attention_bwd_dq_kernel(
    Q, K, V, G, dY, Lse, Delta, dQ,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sv_b, sv_h, sv_s, sv_d,
    sg_b, sg_h, sg_l, sg_d,
    sdy_b, sdy_h, sdy_l, sdy_d,
    H, L, S, GROUP, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """dQ = scale * sum dS K per query block, dS = P * (dO V^T - delta)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit base offsets: tensors may pass 2^31 elements
    b = pid_bh // H
    h = pid_bh % H
    kv_h = h // GROUP
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * sq_b + h * sq_h, rows, L, sq_l, sq_d, dims, HEAD_DIM, BLOCK_D, True)
    dy = _load_tile(dY + b * sdy_b + h * sdy_h, rows, L, sdy_l, sdy_d, dims, HEAD_DIM, BLOCK_D, True)
    gate = _load_tile(G + b * sg_b + h * sg_h, rows, L, sg_l, sg_d, dims, HEAD_DIM, BLOCK_D, True)
    d_out = (dy.to(ACC) * tl.sigmoid(gate.to(ACC))).to(q.dtype)  # dO = dY * s
    lse = tl.load(Lse + pid_bh * L + rows, mask=rows < L, other=0.0) * LOG2E_
    delta = tl.load(Delta + pid_bh * L + rows, mask=rows < L, other=0.0)
    k_base = K + b * sk_b + kv_h * sk_h
    v_base = V + b * sv_b + kv_h * sv_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    full_hi, hi = _key_ranges(start_m, S, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _dq_inner(dq, q, d_out, lse, delta, k_base, v_base, sk_s, sk_d, sv_s, sv_d, rows, dims, 0, full_hi, S,
                   qk_scale, HEAD_DIM, BLOCK_D, IS_CAUSAL, DOT_PRECISION, BLOCK_N, False)
    dq = _dq_inner(dq, q, d_out, lse, delta, k_base, v_base, sk_s, sk_d, sv_s, sv_d, rows, dims, full_hi, hi, S,
                   qk_scale, HEAD_DIM, BLOCK_D, IS_CAUSAL, DOT_PRECISION, BLOCK_N, True)
    _store_tile(dQ + pid_bh * L * HEAD_DIM, rows, L, dims, (dq * scale).to(dQ.dtype.element_ty), HEAD_DIM, BLOCK_D)


MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis, which carries batch * heads
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _common_args(q, k, v, gate, is_causal, scale):
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    if batch * heads > MAX_GRID_Y:
        raise ValueError(f"q: batch * heads = {batch * heads} exceeds {MAX_GRID_Y}; split the batch")
    if head_dim > 256:
        raise ValueError(f"q: head dim {head_dim} exceeds the Triton kernel's 256")
    scale = head_dim**-0.5 if scale is None else scale
    block_d = max(triton.next_power_of_2(head_dim), 16)
    exact = q.dtype == torch.float64  # float64 (gradcheck on the GPU): float64 accumulation, FMA matmuls
    return dict(
        batch=batch, heads=heads, kv_heads=k.shape[1], q_len=q_len, kv_len=kv_len, head_dim=head_dim,
        scale=scale, gate=gate.expand(q.shape),  # head-wise gate: stride 0 along D
        stats_dtype=torch.float64 if exact else torch.float32,  # lse and delta
        match=dict(dtype=DTYPE_NAMES[q.dtype], D=block_d, causal=bool(is_causal)),
        sizes=dict(L=q_len, S=kv_len),
        meta=dict(
            HEAD_DIM=head_dim, BLOCK_D=block_d, IS_CAUSAL=bool(is_causal),
            DOT_PRECISION="tf32" if q.dtype in (torch.float16, torch.bfloat16) else "ieee",
            ACC=tl.float64 if exact else tl.float32,
        ),
    )


def gated_attention_forward(q, k, v, gate, is_causal=False, scale=None):
    """(out [B, Hq, L, D] in q's dtype, lse [B, Hq, L] float32, float64 for float64 q). gate=None runs
    the same kernel ungated (plain SDPA): the benchmark's measure of what the fused gate costs."""
    has_gate = gate is not None
    gate = q[..., :1] if gate is None else gate  # never read when ungated
    a = _common_args(q, k, v, gate, is_causal, scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=a["stats_dtype"], device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    g = a["gate"]

    def run(config):
        constexprs, options = split_options(config)
        gated_attention_fwd_kernel[(triton.cdiv(a["q_len"], config["BLOCK_M"]), a["batch"] * a["heads"])](
            q, k, v, g, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *g.stride(),
            a["heads"], a["q_len"], a["kv_len"], a["heads"] // a["kv_heads"], a["scale"] * LOG2E,
            **a["meta"], **constexprs, **options, HAS_GATE=has_gate,
        )

    FWD.launch(run, q.device, a["match"], a["sizes"])
    return out, lse


def gated_attention_backward(grad_out, q, k, v, gate, out, lse, is_causal=False, scale=None):
    """(dq, dk, dv, dgate) in the dtypes and shapes of (q, k, v, gate)."""
    a = _common_args(q, k, v, gate, is_causal, scale)
    batch, heads, kv_heads, q_len, kv_len = a["batch"], a["heads"], a["kv_heads"], a["q_len"], a["kv_len"]
    head_wise = gate.shape[-1] == 1 and a["head_dim"] != 1
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if q.numel() == 0:  # no query: nothing flows back to the keys
        return dq, dk.zero_(), dv.zero_(), dgate
    out = out.contiguous()
    lse = lse.to(a["stats_dtype"]).contiguous()
    g = a["gate"]
    delta = torch.empty(q.shape[:3], dtype=a["stats_dtype"], device=q.device)
    meta = a["meta"]

    def run_preprocess(config):
        constexprs, options = split_options(config)
        gated_attention_bwd_preprocess_kernel[(triton.cdiv(q_len, config["BLOCK_M"]), batch * heads)](
            grad_out, out, g, delta, dgate,
            *grad_out.stride(), *g.stride(), heads, q_len,
            HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"], HEAD_WISE_GATE=head_wise, ACC=meta["ACC"],
            **constexprs, **options,
        )

    PREPROCESS.launch(run_preprocess, q.device, dict(dtype=a["match"]["dtype"], D=meta["BLOCK_D"]))
    if kv_len == 0:  # no key: the output is 0 whatever q, k, v are
        return dq.zero_(), dk, dv, dgate
    strides = (*q.stride(), *k.stride(), *v.stride(), *g.stride(), *grad_out.stride())
    qk_scale = a["scale"] * LOG2E

    def run_dkdv(config):
        constexprs, options = split_options(config)
        gated_attention_bwd_dkdv_kernel[(triton.cdiv(kv_len, config["BLOCK_N"]), batch * kv_heads)](
            q, k, v, g, grad_out, lse, delta, dk, dv, *strides,
            heads, kv_heads, q_len, kv_len, heads // kv_heads, qk_scale, a["scale"], **meta, **constexprs, **options,
        )

    def run_dq(config):
        constexprs, options = split_options(config)
        gated_attention_bwd_dq_kernel[(triton.cdiv(q_len, config["BLOCK_M"]), batch * heads)](
            q, k, v, g, grad_out, lse, delta, dq, *strides,
            heads, q_len, kv_len, heads // kv_heads, qk_scale, a["scale"], **meta, **constexprs, **options,
        )

    DKDV.launch(run_dkdv, q.device, a["match"], a["sizes"])
    DQ.launch(run_dq, q.device, a["match"], a["sizes"])
    return dq, dk, dv, dgate


def flops(batch, heads, q_len, kv_len, head_dim, is_causal, backward=False):
    """Matmul FLOPs over the (query, key) pairs the mask allows: 2 matmuls of 2*D FLOPs per pair
    forward, 5 backward (so forward + backward = 3.5x forward)."""
    if is_causal:  # top-left: query l sees min(l + 1, S) keys
        shared = min(q_len, kv_len)
        pairs = shared * (shared + 1) // 2 + max(q_len - kv_len, 0) * kv_len
    else:
        pairs = q_len * kv_len
    forward = 4 * batch * heads * pairs * head_dim
    return forward * (3.5 if backward else 1.0)

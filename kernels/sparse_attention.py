"""Triton top-k sparse attention (docs/ops.md §3), forward and backward.

One program per (token, KV head). Its Hq/Hkv query heads share the token's index list, so they are
the M dimension of every tl.dot: a tile of BLOCK_K selected keys is gathered once ([BLOCK_K, Dqk] and
[BLOCK_K, Dv] rows of k and v) and serves the whole group (FlashMLA's sparse kernels do the same for
MQA). Indices outside [0, S) are masked out of the gather (never loaded) and of the softmax.

Forward: online softmax in fp32 (base 2) over the key tiles, out normalised once, lse saved. With a
small group (16 heads) the heads are too few for the M of Hopper's wgmma (>= 64): the KEYS_AS_M config
computes the transposed products S^T = K Q^T and O^T += V^T P^T instead (keys and Dv as M).
A group wider than the head block (64 heads; 16 for fp32/float64 and MLA's wide heads) is split over
grid axis 2.
Backward: with P = exp(S - lse), delta = rowsum(dO * O) - dlse,
    dS = P * (dO V^T - delta) * sm_scale,   dq = dS K,   dk[idx] += dS^T q,   dv[idx] += P^T dO.
dq is summed in the program; dk and dv rows are shared between tokens, so either
  - atomics (default): fp32 (float64 for float64) tl.atomic_add into a zeroed buffer, the order of
    additions left to the hardware (results may differ in the last bits from run to run), or
  - deterministic (torch.are_deterministic_algorithms_enabled()): the program stores P and dS
    ([T, Hkv, K, group] fp32), the launcher sorts the (token, slot) entries of each KV head by key
    (stable, so token order within a key), and one program per (key, KV head) sums its segment in
    that fixed order. It costs the P/dS buffers (8 * T * Hq * K bytes) and a sort.

Dqk != Dv: k and v may be views of one tensor (MLA's kv[..., :576] and kv[..., :512]): any strides.
A Dqk that is not a power of two is a power-of-two main block plus a power-of-two tail (qk_blocks: MLA's
576 = 512 + 64), each its own tl.dot, instead of one block padded to the next power of two (1024 for
576: 44% of the score matmuls on zero columns, and a backward that spilled registers).
"""
import torch
import triton
import triton.language as tl

from .float64_scalars import exact_scalar, float64_scalars
from .tuning import KernelConfigs, split_options

LOG2E = 1.4426950408889634
LOG2E_ = tl.constexpr(LOG2E)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _element_bytes(match):
    return {"fp64": 8, "fp32": 4}.get(match["dtype"], 2)


def _fwd_heuristic(match):
    """Picked from the sm_90 compile report (no spills, no stack, fits shared memory); not timed on a GPU
    yet, so no table entries. 2-byte dtypes: 64 keys a tile (32 for MLA's wide heads), 8 warps for 64
    heads; fp32 (FMA) 32 keys over 8 warps; float64 (the exact path) 16. Head blocks under 64 take the
    transposed product (KEYS_AS_M): its M is the 64 keys and Dv, which Hopper's wgmma needs (M >= 64);
    with 16 heads as M the matmuls fall back to mma.sync."""
    wide = max(match["Dqk"], match["Dv"]) > 256
    if match["dtype"] == "fp64":
        return dict(BLOCK_K=16, num_warps=4, num_stages=1)
    if match["dtype"] == "fp32":
        return dict(BLOCK_K=32, num_warps=8, num_stages=2)
    if match["H"] < 64 and not wide:
        return dict(BLOCK_K=64, num_warps=4, num_stages=2, KEYS_AS_M=True)
    return dict(BLOCK_K=32 if wide else 64, num_warps=8 if match["H"] >= 64 or wide else 4, num_stages=2)


def _bwd_heuristic(match):
    """As _fwd_heuristic, for the backward's larger live set (dq, and the dS, P tiles)."""
    wide = max(match["Dqk"], match["Dv"]) > 256
    if match["dtype"] == "fp64":
        return dict(BLOCK_K=16, num_warps=8, num_stages=1)
    if match["dtype"] == "fp32" or wide:
        return dict(BLOCK_K=16 if wide else 64, num_warps=8, num_stages=2)
    return dict(BLOCK_K=32 if match["H"] >= 64 else 64, num_warps=8, num_stages=2)


def _space(match):
    return [dict(BLOCK_K=k, num_warps=w, num_stages=s) for k in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)]


def _fwd_space(match):
    """The forward also tries both orientations of its matmuls (KEYS_AS_M)."""
    return [dict(config, KEYS_AS_M=keys_as_m) for config in _space(match) for keys_as_m in (False, True)]


def _smallest(match):
    return dict(BLOCK_K=16, num_warps=4, num_stages=1)


def _shared(config, match):
    """The query-group tile plus `num_stages` gathered key and value tiles."""
    return (match["H"] * match["Dqk"] + config["num_stages"] * config["BLOCK_K"] * (match["Dqk"] + match["Dv"])) \
        * _element_bytes(match)


FWD = KernelConfigs("sparse_attention_fwd", space=_fwd_space, heuristic=_fwd_heuristic, smallest=_smallest, shared=_shared)
BWD = KernelConfigs("sparse_attention_bwd", space=_space, heuristic=_bwd_heuristic, smallest=_smallest, shared=_shared)
DKDV = KernelConfigs(
    "sparse_attention_bwd_dkdv_deterministic",
    space=[dict(num_warps=w) for w in (1, 2, 4)],
    heuristic=lambda match: dict(num_warps=4),
    smallest=lambda match: dict(num_warps=4),
)


@triton.jit
def _gather(base, keys, valid, stride_row, dims, DIM: tl.constexpr):
    """Rows `keys` of a [S, DIM] matrix (one KV head), zero where not valid: invalid rows are not read."""
    return tl.load(base + keys[:, None] * stride_row + dims[None, :], mask=valid[:, None] & (dims < DIM)[None, :],
                   other=0.0)


@triton.jit
def _key_tile(Idx, idx_base, s_idx_j, start, TOPK, S, k_base, v_base, sk_s, sv_s, dqk, dv,
              QK_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DQK: tl.constexpr,
              BLOCK_DT: tl.constexpr):
    """The slots [start, start + BLOCK_K) of the index list: (valid, keys, k rows, k's tail columns
    (k itself, unused, when there is no tail), v rows)."""
    slots = start + tl.arange(0, BLOCK_K)
    idx = tl.load(Idx + idx_base + slots * s_idx_j, mask=slots < TOPK, other=-1)
    valid = (idx >= 0) & (idx < S)
    keys = tl.where(valid, idx, 0).to(tl.int64)
    k = _gather(k_base, keys, valid, sk_s, dqk, QK_DIM)
    k_tail = k
    if BLOCK_DT > 0:
        k_tail = _gather(k_base + BLOCK_DQK, keys, valid, sk_s, tl.arange(0, BLOCK_DT), QK_DIM - BLOCK_DQK)
    v = _gather(v_base, keys, valid, sv_s, dv, V_DIM)
    return slots, valid, keys, k, k_tail, v


@triton.jit
def _query_rows(Q, t, sq_t, sq_h, rows, head_ok, dqk, QK_DIM: tl.constexpr, BLOCK_DQK: tl.constexpr,
                BLOCK_DT: tl.constexpr):
    """The group's query rows [BLOCK_H, BLOCK_DQK] and their tail columns (q itself when none)."""
    base = Q + t * sq_t + rows[:, None] * sq_h
    q = tl.load(base + dqk[None, :], mask=head_ok[:, None] & (dqk < QK_DIM)[None, :], other=0.0)
    q_tail = q
    if BLOCK_DT > 0:
        dt = tl.arange(0, BLOCK_DT)
        q_tail = tl.load(base + BLOCK_DQK + dt[None, :], mask=head_ok[:, None] & (dt < QK_DIM - BLOCK_DQK)[None, :],
                         other=0.0)
    return q, q_tail


@triton.jit
def _scores(a, a_tail, b, b_tail, BLOCK_DT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ b^T over the head dim, main block plus tail."""
    scores = tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION)
    if BLOCK_DT > 0:
        scores += tl.dot(a_tail, tl.trans(b_tail), input_precision=DOT_PRECISION)
    return scores


@triton.jit
def sparse_attention_fwd_kernel(
    Q, K, V, Idx, Out, Lse,
    sq_t, sq_h, sk_s, sk_h, sv_s, sv_h, s_idx_t, s_idx_h, s_idx_j,
    TOPK, S, GROUP, qk_scale,  # qk_scale = sm_scale * log2(e): the softmax runs in base 2
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KEYS_AS_M: tl.constexpr, BLOCK_DT: tl.constexpr = 0, QK_SCALE_F64: tl.constexpr = None,
):
    t = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tensors may pass 2^31 elements
    qk_scale = exact_scalar(qk_scale, QK_SCALE_F64, ACC)  # float64: exact (a float argument is float32 on a GPU)
    g = tl.program_id(1).to(tl.int64)
    num_heads = tl.num_programs(1) * GROUP
    heads = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)  # this program's block of the group
    head_ok = heads < GROUP
    rows = g * GROUP + heads  # the group's query heads
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    q, q_tail = _query_rows(Q, t, sq_t, sq_h, rows, head_ok, dqk, QK_DIM, BLOCK_DQK, BLOCK_DT)
    k_base = K + g * sk_h
    v_base = V + g * sv_h
    idx_base = t * s_idx_t + g * s_idx_h

    m_i = tl.full([BLOCK_H], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_H], ACC)
    if KEYS_AS_M:  # the transposed product: keys and Dv as the M of both matmuls
        acc = tl.zeros([BLOCK_DV, BLOCK_H], ACC)
    else:
        acc = tl.zeros([BLOCK_H, BLOCK_DV], ACC)
    for start in tl.range(0, TOPK, BLOCK_K):
        slots, valid, keys, k, k_tail, v = _key_tile(Idx, idx_base, s_idx_j, start, TOPK, S, k_base, v_base,
                                                     sk_s, sv_s, dqk, dv, QK_DIM, V_DIM, BLOCK_K, BLOCK_DQK, BLOCK_DT)
        if KEYS_AS_M:  # S^T = K Q^T [BLOCK_K, BLOCK_H], O^T += V^T P^T [BLOCK_DV, BLOCK_H]
            scores = _scores(k, k_tail, q, q_tail, BLOCK_DT, DOT_PRECISION).to(ACC) * qk_scale
            scores = tl.where(valid[:, None], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no valid key yet
            p = tl.math.exp2(scores - m_safe[None, :])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha[None, :] + tl.dot(tl.trans(v), p.to(v.dtype), input_precision=DOT_PRECISION).to(ACC)
        else:  # S = Q K^T [BLOCK_H, BLOCK_K], O += P V [BLOCK_H, BLOCK_DV]
            scores = _scores(q, q_tail, k, k_tail, BLOCK_DT, DOT_PRECISION).to(ACC) * qk_scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(scores - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION).to(ACC)
        m_i = m_new
    if KEYS_AS_M:
        acc = tl.trans(acc)

    # A row with no valid key: out = 0, lse = -inf.
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_rows = t * num_heads + rows
    tl.store(Out + out_rows[:, None] * V_DIM + dv[None, :], out.to(Out.dtype.element_ty),
             mask=head_ok[:, None] & (dv < V_DIM)[None, :])
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) / LOG2E_, float("-inf"))
    tl.store(Lse + out_rows, lse, mask=head_ok)


@triton.jit
def sparse_attention_bwd_kernel(
    Q, K, V, Idx, DOut, DLse, Out, Lse, DQ, DK, DV, PBuf, DSBuf,
    sq_t, sq_h, sk_s, sk_h, sv_s, sv_h, s_idx_t, s_idx_h, s_idx_j, sdo_t, sdo_h,
    TOPK, S, GROUP, qk_scale, sm_scale,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DETERMINISTIC: tl.constexpr, BLOCK_DT: tl.constexpr = 0, QK_SCALE_F64: tl.constexpr = None,
    SM_SCALE_F64: tl.constexpr = None,
):
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    qk_scale = exact_scalar(qk_scale, QK_SCALE_F64, ACC)  # float64: exact (float arguments are float32 on a GPU)
    sm_scale = exact_scalar(sm_scale, SM_SCALE_F64, ACC)
    kv_heads = tl.num_programs(1)
    num_heads = kv_heads * GROUP
    heads = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)  # this program's block of the group
    head_ok = heads < GROUP
    rows = g * GROUP + heads
    out_rows = t * num_heads + rows
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    qk_mask = head_ok[:, None] & (dqk < QK_DIM)[None, :]
    v_mask = head_ok[:, None] & (dv < V_DIM)[None, :]
    q, q_tail = _query_rows(Q, t, sq_t, sq_h, rows, head_ok, dqk, QK_DIM, BLOCK_DQK, BLOCK_DT)
    d_out = tl.load(DOut + t * sdo_t + rows[:, None] * sdo_h + dv[None, :], mask=v_mask, other=0.0)
    out = tl.load(Out + out_rows[:, None] * V_DIM + dv[None, :], mask=v_mask, other=0.0)
    delta = tl.sum(d_out.to(ACC) * out.to(ACC), axis=1) - tl.load(DLse + out_rows, mask=head_ok, other=0.0).to(ACC)
    lse = tl.load(Lse + out_rows, mask=head_ok, other=float("-inf")).to(ACC)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E_)  # no valid key: P = exp2(-inf) = 0
    k_base = K + g * sk_h
    v_base = V + g * sv_h
    idx_base = t * s_idx_t + g * s_idx_h

    dq = tl.zeros([BLOCK_H, BLOCK_DQK], ACC)
    dq_tail = dq  # the tail columns' dq (unused without a tail)
    if BLOCK_DT > 0:
        dq_tail = tl.zeros([BLOCK_H, BLOCK_DT], ACC)
    for start in tl.range(0, TOPK, BLOCK_K):
        slots, valid, keys, k, k_tail, v = _key_tile(Idx, idx_base, s_idx_j, start, TOPK, S, k_base, v_base,
                                                     sk_s, sv_s, dqk, dv, QK_DIM, V_DIM, BLOCK_K, BLOCK_DQK, BLOCK_DT)
        scores = _scores(q, q_tail, k, k_tail, BLOCK_DT, DOT_PRECISION).to(ACC) * qk_scale
        p = tl.where(valid[None, :], tl.math.exp2(scores - lse2[:, None]), 0.0)  # [BLOCK_H, BLOCK_K]
        dp = tl.dot(d_out, tl.trans(v), input_precision=DOT_PRECISION).to(ACC)
        ds = p * (dp - delta[:, None]) * sm_scale
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION).to(ACC)
        if BLOCK_DT > 0:
            dq_tail += tl.dot(ds.to(k.dtype), k_tail, input_precision=DOT_PRECISION).to(ACC)
        if DETERMINISTIC:  # P and dS of each (slot, head), summed per key by the segment kernel
            buf = (t * kv_heads + g) * TOPK * GROUP + slots[:, None] * GROUP + heads[None, :]
            keep = (slots < TOPK)[:, None] & head_ok[None, :]
            tl.store(PBuf + buf, tl.trans(p).to(PBuf.dtype.element_ty), mask=keep)
            tl.store(DSBuf + buf, tl.trans(ds).to(DSBuf.dtype.element_ty), mask=keep)
        else:
            dk_tile = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION).to(ACC)
            dv_tile = tl.dot(tl.trans(p.to(d_out.dtype)), d_out, input_precision=DOT_PRECISION).to(ACC)
            kv_row = keys * kv_heads + g  # rows of the contiguous [S, Hkv, D] gradient buffers
            tl.atomic_add(DK + kv_row[:, None] * QK_DIM + dqk[None, :], dk_tile,
                          mask=valid[:, None] & (dqk < QK_DIM)[None, :], sem="relaxed")
            if BLOCK_DT > 0:
                dt = tl.arange(0, BLOCK_DT)
                dk_tail = tl.dot(tl.trans(ds.to(q.dtype)), q_tail, input_precision=DOT_PRECISION).to(ACC)
                tl.atomic_add(DK + kv_row[:, None] * QK_DIM + BLOCK_DQK + dt[None, :], dk_tail,
                              mask=valid[:, None] & (dt < QK_DIM - BLOCK_DQK)[None, :], sem="relaxed")
            tl.atomic_add(DV + kv_row[:, None] * V_DIM + dv[None, :], dv_tile,
                          mask=valid[:, None] & (dv < V_DIM)[None, :], sem="relaxed")
    tl.store(DQ + out_rows[:, None] * QK_DIM + dqk[None, :], dq.to(DQ.dtype.element_ty), mask=qk_mask)
    if BLOCK_DT > 0:
        dt = tl.arange(0, BLOCK_DT)
        tl.store(DQ + out_rows[:, None] * QK_DIM + BLOCK_DQK + dt[None, :], dq_tail.to(DQ.dtype.element_ty),
                 mask=head_ok[:, None] & (dt < QK_DIM - BLOCK_DQK)[None, :])


@triton.jit
def sparse_attention_bwd_dkdv_kernel(
    Q, DOut, PBuf, DSBuf, Order, Offsets, DK, DV,
    sq_t, sq_h, sdo_t, sdo_h, TOPK, T, GROUP,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
):
    """dk, dv of key `s` of KV head `g`: its segment of the sorted (token, slot) entries, in order."""
    s = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    num_keys = tl.num_programs(0)
    kv_heads = tl.num_programs(1)
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    segment = g * (num_keys + 1) + s  # the launcher's key: one segment per (KV head, key), S for invalid
    begin = tl.load(Offsets + segment)
    end = tl.load(Offsets + segment + 1)
    dk = tl.zeros([BLOCK_DQK], ACC)
    dv_acc = tl.zeros([BLOCK_DV], ACC)
    for e in range(begin, end):
        entry = tl.load(Order + e) - g * T * TOPK  # (t, slot) of this KV head's flattened [T, K] list
        t = entry // TOPK
        slot = entry % TOPK
        for h0 in range(0, GROUP, BLOCK_H):  # the group's heads, BLOCK_H at a time, in order
            heads = h0 + tl.arange(0, BLOCK_H)
            head_ok = heads < GROUP
            buf = ((t * kv_heads + g) * TOPK + slot) * GROUP + heads
            ds = tl.load(DSBuf + buf, mask=head_ok, other=0.0).to(ACC)
            p = tl.load(PBuf + buf, mask=head_ok, other=0.0).to(ACC)
            rows = g * GROUP + heads
            q = tl.load(Q + t * sq_t + rows[:, None] * sq_h + dqk[None, :],
                        mask=head_ok[:, None] & (dqk < QK_DIM)[None, :], other=0.0).to(ACC)
            d_out = tl.load(DOut + t * sdo_t + rows[:, None] * sdo_h + dv[None, :],
                            mask=head_ok[:, None] & (dv < V_DIM)[None, :], other=0.0).to(ACC)
            dk += tl.sum(ds[:, None] * q, axis=0)
            dv_acc += tl.sum(p[:, None] * d_out, axis=0)
    kv_row = s * kv_heads + g
    tl.store(DK + kv_row * QK_DIM + dqk, dk.to(DK.dtype.element_ty), mask=dqk < QK_DIM)
    tl.store(DV + kv_row * V_DIM + dv, dv_acc.to(DV.dtype.element_ty), mask=dv < V_DIM)


def _row_strides(x):
    """Strides of [N, H, D] with a unit last stride (k and v may be column slices of one tensor)."""
    if x.stride(2) != 1 and x.shape[2] > 1:
        x = x.contiguous()
    return x, x.stride(0), x.stride(1)


def qk_blocks(qk_dim):
    """(BLOCK_DQK, BLOCK_DT): the q.k head dim as a power-of-two main block (at least 16, tl.dot's least)
    and a power-of-two tail block for the rest (0 when there is none): 576 -> (512, 64), 128 -> (128, 0)."""
    main = max(16, 1 << (max(qk_dim, 1).bit_length() - 1))
    rest = qk_dim - main
    return main, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def head_block(group, block_dqk, block_dv, full_precision):
    """Query heads per program (the M of its matmuls, at least 16 for tl.dot): the whole group, so each
    key tile is gathered once for all of it, up to 64 heads at head dims up to 256 (the H100's shared
    memory and registers); 16 for wider heads (MLA's 576/512) and for fp32/float64 (FMA, no tensor
    cores: their tiles spill beyond 16). A larger group is split over grid axis 2 (each block gathers
    the tile again)."""
    cap = 16 if full_precision or max(block_dqk, block_dv) > 256 else 64
    return min(max(triton.next_power_of_2(group), 16), cap)


def _common(q, k, v, indices, sm_scale):
    tokens, q_heads, qk_dim = q.shape
    kv_heads, v_dim = k.shape[1], v.shape[2]
    group = q_heads // kv_heads
    sm_scale = qk_dim**-0.5 if sm_scale is None else sm_scale
    exact = q.dtype == torch.float64  # float64 (gradcheck on the GPU): float64 accumulation, FMA matmuls
    block_dqk, block_dt = qk_blocks(qk_dim)
    block_dv = max(triton.next_power_of_2(v_dim), 16)
    full_precision = q.dtype in (torch.float32, torch.float64)
    meta = dict(
        QK_DIM=qk_dim, V_DIM=v_dim, BLOCK_H=head_block(group, block_dqk + block_dt, block_dv, full_precision),
        BLOCK_DQK=block_dqk, BLOCK_DT=block_dt, BLOCK_DV=block_dv,
        ACC=tl.float64 if exact else tl.float32,
        DOT_PRECISION="tf32" if q.dtype in (torch.float16, torch.bfloat16) else "ieee",
    )
    match = dict(dtype=DTYPE_NAMES[q.dtype], H=meta["BLOCK_H"], Dqk=block_dqk + block_dt, Dv=block_dv)
    return tokens, q_heads, kv_heads, group, sm_scale, meta, match


def exact_scales(dtype, sm_scale, backward):
    """float64 inputs: the scales as constexprs too (kernels/float64_scalars.py)."""
    scales = dict(qk_scale=float(sm_scale) * LOG2E, **(dict(sm_scale=sm_scale) if backward else {}))
    return float64_scalars(dtype, **scales)


def sparse_attention_forward(q, k, v, indices, sm_scale=None):
    """(out [T, Hq, Dv] in q's dtype, lse [T, Hq] float32, float64 for float64 q)."""
    tokens, q_heads, kv_heads, group, sm_scale, meta, match = _common(q, k, v, indices, sm_scale)
    stats = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(tokens, q_heads, v.shape[2], dtype=q.dtype, device=q.device)
    lse = torch.empty(tokens, q_heads, dtype=stats, device=q.device)
    if tokens == 0 or k.shape[0] == 0 or indices.shape[2] == 0:  # no key anywhere (and no empty tensor launched)
        return out.zero_(), lse.fill_(float("-inf"))
    q, sq_t, sq_h = _row_strides(q)
    k, sk_s, sk_h = _row_strides(k)
    v, sv_s, sv_h = _row_strides(v)

    def run(config):
        constexprs, options = split_options(config)
        return sparse_attention_fwd_kernel[(tokens, kv_heads, triton.cdiv(group, meta["BLOCK_H"]))](
            q, k, v, indices, out, lse, sq_t, sq_h, sk_s, sk_h, sv_s, sv_h, *indices.stride(),
            indices.shape[2], k.shape[0], group, sm_scale * LOG2E, **meta, **exact_scales(q.dtype, sm_scale, backward=False),
            **{"KEYS_AS_M": False, **constexprs}, **options,
        )

    FWD.launch(run, q.device, match, dict(K=indices.shape[2]))
    return out, lse


def sparse_attention_backward(grad_out, grad_lse, q, k, v, indices, out, lse, sm_scale=None, deterministic=False):
    """(dq, dk, dv) in the dtypes and shapes of (q, k, v)."""
    tokens, q_heads, kv_heads, group, sm_scale, meta, match = _common(q, k, v, indices, sm_scale)
    num_keys, topk = k.shape[0], indices.shape[2]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # Contiguous [S, Hkv, D] buffers: zeroed in each launch by the atomics (the tuner reruns it), written
    # whole by the deterministic segment kernel.
    dk = torch.empty(k.shape, dtype=acc_dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=acc_dtype, device=q.device)
    if tokens == 0 or num_keys == 0 or topk == 0:  # no (query, key) pair: no gradient at all
        return dq.zero_(), dk.zero_().to(k.dtype), dv.zero_().to(v.dtype)
    q, sq_t, sq_h = _row_strides(q)
    k, sk_s, sk_h = _row_strides(k)
    v, sv_s, sv_h = _row_strides(v)
    grad_out, sdo_t, sdo_h = _row_strides(grad_out)
    out, lse, grad_lse = out.contiguous(), lse.contiguous(), grad_lse.contiguous()
    if deterministic:
        p_buf = torch.empty(tokens, kv_heads, topk, group, dtype=acc_dtype, device=q.device)
        ds_buf = torch.empty_like(p_buf)
    else:
        p_buf = ds_buf = dk  # never touched

    def run(config):
        constexprs, options = split_options(config)
        if not deterministic:  # the atomics add into dk, dv
            dk.zero_()
            dv.zero_()
        return sparse_attention_bwd_kernel[(tokens, kv_heads, triton.cdiv(group, meta["BLOCK_H"]))](
            q, k, v, indices, grad_out, grad_lse, out, lse, dq, dk, dv, p_buf, ds_buf,
            sq_t, sq_h, sk_s, sk_h, sv_s, sv_h, *indices.stride(), sdo_t, sdo_h,
            topk, num_keys, group, sm_scale * LOG2E, sm_scale, **meta, **exact_scales(q.dtype, sm_scale, backward=True),
            **constexprs, **options, DETERMINISTIC=deterministic,
        )

    BWD.launch(run, q.device, dict(match, deterministic=deterministic), dict(K=topk))
    if deterministic:
        order, offsets = _segments_by_key(indices, num_keys)

        def run_dkdv(config):
            constexprs, options = split_options(config)
            return sparse_attention_bwd_dkdv_kernel[(num_keys, kv_heads)](
                q, grad_out, p_buf, ds_buf, order, offsets, dk, dv, sq_t, sq_h, sdo_t, sdo_h, topk, tokens, group,
                QK_DIM=meta["QK_DIM"], V_DIM=meta["V_DIM"], BLOCK_H=min(meta["BLOCK_H"], 16),
                BLOCK_DQK=max(triton.next_power_of_2(meta["QK_DIM"]), 16), BLOCK_DV=meta["BLOCK_DV"], ACC=meta["ACC"],
                **constexprs, **options,
            )

        DKDV.launch(run_dkdv, q.device, dict(dtype=match["dtype"], Dqk=match["Dqk"], Dv=match["Dv"]))
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _segments_by_key(indices, num_keys):
    """The (KV head, token, slot) entries sorted by (KV head, key), stably (token order within a key):
    order [Hkv * T * K] int64 positions in the flattened [Hkv, T, K] list, and offsets
    [Hkv * (S + 1) + 1] where segment g * (S + 1) + s holds key s of head g (s = S: invalid indices)."""
    tokens, kv_heads, topk = indices.shape
    per_head = indices.permute(1, 0, 2).reshape(kv_heads, tokens * topk).long()
    valid = (per_head >= 0) & (per_head < num_keys)
    segment = torch.where(valid, per_head, num_keys) + torch.arange(kv_heads, device=indices.device)[:, None] * (
        num_keys + 1)
    sorted_segment, order = torch.sort(segment.flatten(), stable=True)
    # Segment starts by binary search (bincount/cumsum have no deterministic CUDA implementation).
    boundaries = torch.arange(kv_heads * (num_keys + 1) + 1, device=indices.device)
    return order, torch.searchsorted(sorted_segment, boundaries)


def flops(tokens, q_heads, topk, qk_dim, v_dim=None, backward=False):
    """Matmul FLOPs of the selected (query head, key) pairs: 2*Dqk (scores) + 2*Dv (P V) each forward
    (the issue's 4 * T * Hq * K * D when Dqk = Dv = D); the backward's five matmuls are 2.5x that."""
    v_dim = qk_dim if v_dim is None else v_dim
    forward = 2 * tokens * q_heads * topk * (qk_dim + v_dim)
    return forward * (2.5 if backward else 1.0)

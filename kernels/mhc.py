"""Triton mHC (arXiv 2512.24880, eq. 7-9; docs/ops.md §5): mhc_pre and mhc_post, forward and backward.

Tiles over the streams are NP wide (n rounded up to a power of two, at least 4, padding masked), so
a token's n x n Sinkhorn block is a [BLOCK_T, NP, NP] register tile (kernels/sinkhorn.py's helpers).

mhc_pre forward: one program per BLOCK_T tokens. Its first loop reads x once for r and x.phi
(RMSNorm after the matmul, so the normalisation is a per-token scale: y = (x.phi) / r); the three
coefficient sets and the Sinkhorn of the n x n block follow in registers; the second loop forms
x_in from a second read of the same tokens' x, walking the channels backwards so it starts on the
chunks the first loop read last (most likely still in L2; unmeasured: a program's tokens are
BLOCK_T * n * C values, 1 MB at the bench shape, too many to keep on chip).

mhc_post forward and backward: one program per BLOCK_T tokens, one pass over the channels; the
backward's reductions over channels (dh_post, dh_res) stay in registers.

mhc_pre backward: a token kernel (dh_pre = <g_x_in, x_i>, the coefficient gradients, Sinkhorn's
backward, per-program partial sums of dalpha and dbias) then a stream kernel over (channel block,
token split) for dx and per-split partial sums of dphi. The partial sums are reduced by torch
afterwards: deterministic, no float atomics.
"""
import torch
import triton
import triton.language as tl

from .sinkhorn import sinkhorn_backward_tile, sinkhorn_tile, unrolled_iters
from .tuning import KernelConfigs, split_options

RMS_EPS = tl.constexpr(1e-6)  # reference.MHC_RMS_EPS
SINKHORN_EPS = tl.constexpr(1e-6)


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _token_range(block, BLOCK_T: tl.constexpr):
    """Token indices of a block, int64: token * n * C passes 2^31 at 2^17 tokens of n = 4, C = 4096."""
    return block.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)


@triton.jit
def _stream_tile(ptr, t, tokens, n, channels, c, NP: tl.constexpr):
    """[BLOCK_T, NP, BLOCK_C] view of a [tokens, n, channels] tensor at tokens t and channels c."""
    i = tl.arange(0, NP)[None, :, None]
    offsets = t[:, None, None] * n * channels + i * channels + c[None, None, :]
    mask = (t[:, None, None] < tokens) & (i < n) & (c[None, None, :] < channels)
    return offsets, mask


@triton.jit
def _res_columns(n, NP: tl.constexpr):
    """Column 2n + i*n + j of the coefficients for each (i, j) of an NP x NP block, with its mask."""
    i = tl.arange(0, NP)[:, None]
    j = tl.arange(0, NP)[None, :]
    return 2 * n + i * n + j, (i < n) & (j < n)


# ---- mhc_pre forward ---------------------------------------------------------------------------


@triton.jit
def mhc_pre_fwd_kernel(x_ptr, phi_ptr, alpha_ptr, bias_ptr, x_in_ptr, h_post_ptr, h_res_ptr, y_ptr, r_ptr,
                       tokens, n, channels, iters,
                       ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, NP: tl.constexpr, WC: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    t = _token_range(tl.program_id(0), BLOCK_T)
    token_ok = t < tokens
    width = n * channels
    m = n * n + 2 * n
    q = tl.arange(0, WC)  # pre/post coefficient columns (WC >= 16 for tl.dot)
    res_cols, res_ok = _res_columns(n, NP)
    res_cols = tl.reshape(res_cols, [NP * NP])
    res_ok = tl.reshape(res_ok, [NP * NP])
    acc_pre = tl.zeros([BLOCK_T, WC], ACC)
    acc_post = tl.zeros([BLOCK_T, WC], ACC)
    acc_res = tl.zeros([BLOCK_T, NP * NP], ACC)
    sum_squares = tl.zeros([BLOCK_T], ACC)
    for k0 in tl.range(0, width, BLOCK_K):  # the one read of x for r and x.phi
        k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + t[:, None] * width + k[None, :], mask=token_ok[:, None] & (k[None, :] < width),
                     other=0.0).to(ACC)
        sum_squares += tl.sum(xk * xk, axis=1)
        rows = phi_ptr + k[:, None] * m
        k_ok = k[:, None] < width
        phi_pre = tl.load(rows + q[None, :], mask=k_ok & (q[None, :] < n), other=0.0)
        phi_post = tl.load(rows + n + q[None, :], mask=k_ok & (q[None, :] < n), other=0.0)
        phi_res = tl.load(rows + res_cols[None, :], mask=k_ok & res_ok[None, :], other=0.0)
        acc_pre = tl.dot(xk, phi_pre, acc_pre, input_precision=DOT_PRECISION, out_dtype=ACC)
        acc_post = tl.dot(xk, phi_post, acc_post, input_precision=DOT_PRECISION, out_dtype=ACC)
        acc_res = tl.dot(xk, phi_res, acc_res, input_precision=DOT_PRECISION, out_dtype=ACC)
    r = tl.sqrt(sum_squares / width + RMS_EPS)
    y_pre = acc_pre / r[:, None]
    y_post = acc_post / r[:, None]
    y_res = acc_res / r[:, None]
    tl.store(r_ptr + t, r, mask=token_ok)
    q_ok = token_ok[:, None] & (q[None, :] < n)
    tl.store(y_ptr + t[:, None] * m + q[None, :], y_pre, mask=q_ok)
    tl.store(y_ptr + t[:, None] * m + n + q[None, :], y_post, mask=q_ok)
    tl.store(y_ptr + t[:, None] * m + res_cols[None, :], y_res, mask=token_ok[:, None] & res_ok[None, :])

    # mHC eq. 8: the three coefficient sets.
    h_pre = _sigmoid(tl.load(alpha_ptr) * y_pre + tl.load(bias_ptr + q, mask=q < n, other=0.0)[None, :])
    h_pre = tl.where(q[None, :] < n, h_pre, 0.0)
    h_post = 2.0 * _sigmoid(tl.load(alpha_ptr + 1) * y_post + tl.load(bias_ptr + n + q, mask=q < n, other=0.0)[None, :])
    tl.store(h_post_ptr + t[:, None] * n + q[None, :], h_post, mask=q_ok)
    logits = tl.load(alpha_ptr + 2) * y_res + tl.load(bias_ptr + res_cols, mask=res_ok, other=0.0)[None, :]
    logits = tl.where(res_ok[None, :], logits, float("-inf"))
    h_res = sinkhorn_tile(tl.reshape(logits, [BLOCK_T, NP, NP]), iters, SINKHORN_EPS)
    i = tl.arange(0, NP)[None, :, None]
    j = tl.arange(0, NP)[None, None, :]
    tl.store(h_res_ptr + t[:, None, None] * n * n + i * n + j, h_res,
             mask=(t[:, None, None] < tokens) & (i < n) & (j < n))

    # x_in = sum_i h_pre_i x_i. h_pre's first NP columns hold the n streams (the rest are 0).
    h_pre = tl.sum(tl.reshape(h_pre, [BLOCK_T, WC // NP, NP]), axis=1)[:, :, None]
    blocks = tl.cdiv(channels, BLOCK_C)
    for reverse_block in tl.range(0, blocks):
        c = (blocks - 1 - reverse_block) * BLOCK_C + tl.arange(0, BLOCK_C)
        offsets, mask = _stream_tile(x_ptr, t, tokens, n, channels, c, NP)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        x_in = tl.sum(x * h_pre, axis=1)
        tl.store(x_in_ptr + t[:, None] * channels + c[None, :], x_in.to(x_in_ptr.dtype.element_ty),
                 mask=token_ok[:, None] & (c[None, :] < channels))


# ---- mhc_post forward and backward ------------------------------------------------------------


@triton.jit
def _coefficient_tiles(h_post_ptr, h_res_ptr, t, tokens, n, ACC: tl.constexpr, NP: tl.constexpr):
    """h_post [BLOCK_T, NP] and h_res [BLOCK_T, NP, NP] of tokens t, zero-padded."""
    i = tl.arange(0, NP)
    h_post = tl.load(h_post_ptr + t[:, None] * n + i[None, :], mask=(t[:, None] < tokens) & (i[None, :] < n),
                     other=0.0).to(ACC)
    ii = i[None, :, None]
    jj = i[None, None, :]
    h_res = tl.load(h_res_ptr + t[:, None, None] * n * n + ii * n + jj,
                    mask=(t[:, None, None] < tokens) & (ii < n) & (jj < n), other=0.0).to(ACC)
    return h_post, h_res


@triton.jit
def mhc_post_fwd_kernel(x_ptr, f_ptr, h_post_ptr, h_res_ptr, out_ptr, tokens, n, channels,
                        ACC: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = _token_range(tl.program_id(0), BLOCK_T)
    h_post, h_res = _coefficient_tiles(h_post_ptr, h_res_ptr, t, tokens, n, ACC, NP)
    for c0 in tl.range(0, channels, BLOCK_C):  # (n+1)C reads and nC writes per token (mHC eq. 3)
        c = c0 + tl.arange(0, BLOCK_C)
        offsets, mask = _stream_tile(x_ptr, t, tokens, n, channels, c, NP)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        f = tl.load(f_ptr + t[:, None] * channels + c[None, :], mask=(t[:, None] < tokens) & (c[None, :] < channels),
                    other=0.0).to(ACC)
        mixed = tl.sum(h_res[:, :, :, None] * x[:, None, :, :], axis=2)  # [BLOCK_T, NP(i), BLOCK_C]
        out = mixed + h_post[:, :, None] * f[:, None, :]
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def mhc_post_bwd_kernel(grad_ptr, x_ptr, f_ptr, h_post_ptr, h_res_ptr, dx_ptr, df_ptr, dh_post_ptr, dh_res_ptr,
                        tokens, n, channels,
                        ACC: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    t = _token_range(tl.program_id(0), BLOCK_T)
    h_post, h_res = _coefficient_tiles(h_post_ptr, h_res_ptr, t, tokens, n, ACC, NP)
    dh_post = tl.zeros([BLOCK_T, NP], ACC)
    dh_res = tl.zeros([BLOCK_T, NP, NP], ACC)
    for c0 in tl.range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        offsets, mask = _stream_tile(x_ptr, t, tokens, n, channels, c, NP)
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(ACC)  # [BLOCK_T, NP(i), BLOCK_C]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)  # [BLOCK_T, NP(j), BLOCK_C]
        f_offsets = t[:, None] * channels + c[None, :]
        f_mask = (t[:, None] < tokens) & (c[None, :] < channels)
        f = tl.load(f_ptr + f_offsets, mask=f_mask, other=0.0).to(ACC)
        dx = tl.sum(h_res[:, :, :, None] * g[:, :, None, :], axis=1)  # dx_j = sum_i h_res_ij g_i
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        df = tl.sum(h_post[:, :, None] * g, axis=1)
        tl.store(df_ptr + f_offsets, df.to(df_ptr.dtype.element_ty), mask=f_mask)
        dh_post += tl.sum(g * f[:, None, :], axis=2)
        dh_res += tl.sum(g[:, :, None, :] * x[:, None, :, :], axis=3)
    i = tl.arange(0, NP)
    tl.store(dh_post_ptr + t[:, None] * n + i[None, :], dh_post, mask=(t[:, None] < tokens) & (i[None, :] < n))
    ii = i[None, :, None]
    jj = i[None, None, :]
    tl.store(dh_res_ptr + t[:, None, None] * n * n + ii * n + jj, dh_res,
             mask=(t[:, None, None] < tokens) & (ii < n) & (jj < n))


# ---- mhc_pre backward -------------------------------------------------------------------------


@triton.jit
def mhc_pre_bwd_token_kernel(grad_x_in_ptr, grad_h_post_ptr, grad_h_res_ptr, x_ptr, alpha_ptr, bias_ptr, y_ptr, r_ptr,
                             h_pre_ptr, g_s_ptr, through_r_ptr, partial_ptr, tokens, n, channels, iters,
                             ACC: tl.constexpr, NP: tl.constexpr, UNROLLED_ITERS: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per token: g_z, the gradient of z = alpha * y + bias (mHC eq. 8), then g_s = alpha g_z / r (s = x.phi)
    and through_r = -<alpha g_z, y> / (nC r^2), what dx needs besides x and g_x_in. partial_ptr gets this
    program's sums of g_z y (dalpha, 3 values) and g_z (dbias, m values)."""
    pid = tl.program_id(0)
    t = _token_range(pid, BLOCK_T)
    token_ok = t < tokens
    m = n * n + 2 * n
    dh_pre = tl.zeros([BLOCK_T, NP], ACC)
    for c0 in tl.range(0, channels, BLOCK_C):  # dh_pre_i = <g_x_in, x_i>
        c = c0 + tl.arange(0, BLOCK_C)
        offsets, mask = _stream_tile(x_ptr, t, tokens, n, channels, c, NP)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        g = tl.load(grad_x_in_ptr + t[:, None] * channels + c[None, :],
                    mask=token_ok[:, None] & (c[None, :] < channels), other=0.0).to(ACC)
        dh_pre += tl.sum(x * g[:, None, :], axis=2)
    q = tl.arange(0, NP)
    q_ok = q < n
    tq_ok = token_ok[:, None] & q_ok[None, :]
    y_pre = tl.load(y_ptr + t[:, None] * m + q[None, :], mask=tq_ok, other=0.0)
    y_post = tl.load(y_ptr + t[:, None] * m + n + q[None, :], mask=tq_ok, other=0.0)
    res_cols, res_ok = _res_columns(n, NP)
    res_mask = token_ok[:, None, None] & res_ok[None, :, :]
    y_res = tl.load(y_ptr + t[:, None, None] * m + res_cols[None, :, :], mask=res_mask, other=0.0)
    a_pre = tl.load(alpha_ptr)
    a_post = tl.load(alpha_ptr + 1)
    a_res = tl.load(alpha_ptr + 2)
    h_pre = _sigmoid(a_pre * y_pre + tl.load(bias_ptr + q, mask=q_ok, other=0.0)[None, :])
    g_pre = tl.where(tq_ok, dh_pre * h_pre * (1.0 - h_pre), 0.0)
    tl.store(h_pre_ptr + t[:, None] * n + q[None, :], h_pre, mask=tq_ok)
    h_post = 2.0 * _sigmoid(a_post * y_post + tl.load(bias_ptr + n + q, mask=q_ok, other=0.0)[None, :])
    g_post = tl.load(grad_h_post_ptr + t[:, None] * n + q[None, :], mask=tq_ok, other=0.0).to(ACC)
    g_post = tl.where(tq_ok, g_post * h_post * (1.0 - 0.5 * h_post), 0.0)
    logits = tl.where(res_mask, a_res * y_res + tl.load(bias_ptr + res_cols, mask=res_ok, other=0.0)[None, :, :],
                      float("-inf"))
    g_res = tl.load(grad_h_res_ptr + t[:, None, None] * n * n + (res_cols - 2 * n)[None, :, :], mask=res_mask,
                    other=0.0).to(ACC)
    g_res = sinkhorn_backward_tile(logits, g_res, res_mask, iters, SINKHORN_EPS, UNROLLED_ITERS)
    g_res = tl.where(res_mask, g_res, 0.0)

    row = partial_ptr + pid * (3 + m)
    tl.store(row, tl.sum(tl.sum(g_pre * y_pre, axis=1), axis=0))
    tl.store(row + 1, tl.sum(tl.sum(g_post * y_post, axis=1), axis=0))
    tl.store(row + 2, tl.sum(tl.sum(tl.sum(g_res * y_res, axis=2), axis=1), axis=0))
    tl.store(row + 3 + q, tl.sum(g_pre, axis=0), mask=q_ok)
    tl.store(row + 3 + n + q, tl.sum(g_post, axis=0), mask=q_ok)
    tl.store(row + 3 + res_cols, tl.sum(g_res, axis=0), mask=res_ok)

    g_pre = a_pre * g_pre  # now g_y
    g_post = a_post * g_post
    g_res = a_res * g_res
    dot = tl.sum(g_pre * y_pre, axis=1) + tl.sum(g_post * y_post, axis=1) + tl.sum(tl.sum(g_res * y_res, axis=2), axis=1)
    r = tl.load(r_ptr + t, mask=token_ok, other=1.0)
    tl.store(through_r_ptr + t, -dot / (n * channels * r * r), mask=token_ok)
    inv_r = 1.0 / r
    tl.store(g_s_ptr + t[:, None] * m + q[None, :], g_pre * inv_r[:, None], mask=tq_ok)
    tl.store(g_s_ptr + t[:, None] * m + n + q[None, :], g_post * inv_r[:, None], mask=tq_ok)
    tl.store(g_s_ptr + t[:, None, None] * m + res_cols[None, :, :], g_res * inv_r[:, None, None], mask=res_mask)


@triton.jit
def mhc_pre_bwd_stream_kernel(grad_x_in_ptr, x_ptr, phi_ptr, h_pre_ptr, g_s_ptr, through_r_ptr, dx_ptr, dphi_ptr,
                              tokens, n, channels, tokens_per_split,
                              ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, NP: tl.constexpr, WC: tl.constexpr,
                              BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx = h_pre (x) g_x_in + phi g_s + through_r x over a block of the n*C columns and one split of the
    tokens; dphi's partial sum over that split, sum_t x_t g_s_t^T, into dphi_ptr[split]."""
    width = n * channels
    m = n * n + 2 * n
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < width
    split = tl.program_id(1)
    q = tl.arange(0, WC)
    res_cols, res_ok = _res_columns(n, NP)
    res_cols = tl.reshape(res_cols, [NP * NP])
    res_ok = tl.reshape(res_ok, [NP * NP])
    # phi^T of this column block: [coefficients, BLOCK_K]
    phi_pre = tl.load(phi_ptr + k[None, :] * m + q[:, None], mask=k_ok[None, :] & (q[:, None] < n), other=0.0)
    phi_post = tl.load(phi_ptr + k[None, :] * m + n + q[:, None], mask=k_ok[None, :] & (q[:, None] < n), other=0.0)
    phi_res = tl.load(phi_ptr + k[None, :] * m + res_cols[:, None], mask=k_ok[None, :] & res_ok[:, None], other=0.0)
    dphi_pre = tl.zeros([BLOCK_K, WC], ACC)
    dphi_post = tl.zeros([BLOCK_K, WC], ACC)
    dphi_res = tl.zeros([BLOCK_K, NP * NP], ACC)
    start = split * tokens_per_split
    for t0 in tl.range(start, tl.minimum(start + tokens_per_split, tokens), BLOCK_T):
        t = tl.arange(0, BLOCK_T).to(tl.int64) + t0
        token_ok = t < tokens
        tk_ok = token_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + t[:, None] * width + k[None, :], mask=tk_ok, other=0.0).to(ACC)
        g_x_in = tl.load(grad_x_in_ptr + t[:, None] * channels + (k % channels)[None, :], mask=tk_ok, other=0.0).to(ACC)
        h_pre = tl.load(h_pre_ptr + t[:, None] * n + (k // channels)[None, :], mask=tk_ok, other=0.0)
        through_r = tl.load(through_r_ptr + t, mask=token_ok, other=0.0)
        q_ok = token_ok[:, None] & (q[None, :] < n)
        g_pre = tl.load(g_s_ptr + t[:, None] * m + q[None, :], mask=q_ok, other=0.0)
        g_post = tl.load(g_s_ptr + t[:, None] * m + n + q[None, :], mask=q_ok, other=0.0)
        g_res = tl.load(g_s_ptr + t[:, None] * m + res_cols[None, :], mask=token_ok[:, None] & res_ok[None, :],
                        other=0.0)
        dx = h_pre * g_x_in + through_r[:, None] * x
        dx = tl.dot(g_pre, phi_pre, dx, input_precision=DOT_PRECISION, out_dtype=ACC)
        dx = tl.dot(g_post, phi_post, dx, input_precision=DOT_PRECISION, out_dtype=ACC)
        dx = tl.dot(g_res, phi_res, dx, input_precision=DOT_PRECISION, out_dtype=ACC)
        tl.store(dx_ptr + t[:, None] * width + k[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tk_ok)
        x_t = tl.trans(x)
        dphi_pre = tl.dot(x_t, g_pre, dphi_pre, input_precision=DOT_PRECISION, out_dtype=ACC)
        dphi_post = tl.dot(x_t, g_post, dphi_post, input_precision=DOT_PRECISION, out_dtype=ACC)
        dphi_res = tl.dot(x_t, g_res, dphi_res, input_precision=DOT_PRECISION, out_dtype=ACC)
    out = dphi_ptr + split.to(tl.int64) * width * m + k[:, None] * m
    tl.store(out + q[None, :], dphi_pre, mask=k_ok[:, None] & (q[None, :] < n))
    tl.store(out + n + q[None, :], dphi_post, mask=k_ok[:, None] & (q[None, :] < n))
    tl.store(out + res_cols[None, :], dphi_res, mask=k_ok[:, None] & res_ok[None, :])


# ---- launch configs -----------------------------------------------------------------------------


def padded_streams(n):
    """NP: the stream tiles' width (a power of two, at least 4 so an NP x NP block has >= 16 entries for tl.dot)."""
    return max(triton.next_power_of_2(n), 4)


HALF = ("bfloat16", "float16")


def _pre_fwd_heuristic(match):
    """No spills on sm_90 (bench/hopper_compile.py): x.phi on tf32 tensor cores for half streams,
    3xtf32 (float32) or fp64 FMA tiles otherwise."""
    if match["dtype"] in HALF:
        wide = 64 if match["n"] <= 4 else 32
        return dict(BLOCK_T=32, BLOCK_K=wide, BLOCK_C=wide, num_warps=8, num_stages=2)
    return dict(BLOCK_T=16, BLOCK_K=32, BLOCK_C=64, num_warps=8, num_stages=2)


def _pre_fwd_space(match):
    return [dict(BLOCK_T=bt, BLOCK_K=bk, BLOCK_C=bc, num_warps=w, num_stages=s)
            for bt in (16, 32, 64) for bk in (32, 64) for bc in (32, 64, 128) for w in (4, 8) for s in (2, 3)]


def _post_heuristic(match):
    """About 1K stream values per channel chunk (BLOCK_T tokens x NP streams x BLOCK_C channels), half
    that in float64: the backward's [NP, NP, BLOCK_C] products stay in registers."""
    values = 512 if match["dtype"] == "float64" else 1024
    return dict(BLOCK_T=1, BLOCK_C=max(32, values // match["n"]), num_warps=4)


def _post_space(match):
    base = _post_heuristic(match)["BLOCK_C"]
    return [dict(BLOCK_T=bt, BLOCK_C=max(32, base * f // 2), num_warps=w)
            for bt in (1, 2, 4) for f in (1, 2, 4) for w in (2, 4, 8)]


def _pre_bwd_token_heuristic(match):
    return dict(BLOCK_T=4, BLOCK_C=max(32, 512 // match["n"]), num_warps=4)


def _pre_bwd_token_space(match):
    return [dict(BLOCK_T=bt, BLOCK_C=bc, num_warps=w) for bt in (2, 4, 8, 16) for bc in (64, 128, 256) for w in (2, 4, 8)]


def _pre_bwd_stream_heuristic(match):
    if match["dtype"] in HALF:
        return dict(BLOCK_T=32, BLOCK_K=64, num_warps=8, num_stages=2)
    return dict(BLOCK_T=16, BLOCK_K=64 if match["n"] <= 4 and match["dtype"] == "float32" else 32, num_warps=4,
                num_stages=2)


def _pre_bwd_stream_space(match):
    return [dict(BLOCK_T=bt, BLOCK_K=bk, num_warps=w, num_stages=s)
            for bt in (16, 32, 64) for bk in (32, 64, 128) for w in (4, 8) for s in (2, 3)]


def _interpreter(heuristic):
    """The CPU interpreter (and the fallback when a config does not fit): the heuristic, 16-wide tiles."""
    def smallest(match):
        config = dict(heuristic(match))
        for name in config:
            if name.startswith("BLOCK_"):
                config[name] = min(config[name], 32 if name == "BLOCK_C" else 16)
        return config

    return smallest


PRE_FWD = KernelConfigs("mhc_pre_fwd", space=_pre_fwd_space, heuristic=_pre_fwd_heuristic,
                        smallest=_interpreter(_pre_fwd_heuristic))
POST_FWD = KernelConfigs("mhc_post_fwd", space=_post_space, heuristic=_post_heuristic,
                         smallest=_interpreter(_post_heuristic))
POST_BWD = KernelConfigs("mhc_post_bwd", space=_post_space, heuristic=_post_heuristic,
                         smallest=_interpreter(_post_heuristic))
PRE_BWD_TOKEN = KernelConfigs("mhc_pre_bwd_token", space=_pre_bwd_token_space, heuristic=_pre_bwd_token_heuristic,
                              smallest=_interpreter(_pre_bwd_token_heuristic))
PRE_BWD_STREAM = KernelConfigs("mhc_pre_bwd_stream", space=_pre_bwd_stream_space,
                               heuristic=_pre_bwd_stream_heuristic, smallest=_interpreter(_pre_bwd_stream_heuristic))


# ---- launchers -----------------------------------------------------------------------------------


def _coefficient_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _stream_dtype(x, others, coefficient_dtype):
    """x's dtype when every stream tensor shares it and the coefficients are float32, else the coefficients'."""
    if coefficient_dtype == torch.float64 or any(t.dtype != x.dtype for t in others):
        return coefficient_dtype
    return x.dtype


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(stream_dtype):
    """The dots' precision: tf32 tensor cores for half streams (phi's tf32 rounding, 2^-11, is below the
    streams' own); tf32x3 keeps float32 accuracy for float32 streams; float64 has no tensor-core path."""
    if stream_dtype in (torch.bfloat16, torch.float16):
        return "tf32"
    return "ieee" if stream_dtype == torch.float64 else "tf32x3"


def _key(x, n):
    return dict(dtype=str(x.dtype).replace("torch.", ""), n=padded_streams(n))


def _run(configs, kernel, grid, device, key, channels, *args, **constexprs):
    def run(config):
        blocks, options = split_options(config)
        kernel[grid(blocks)](*args, **constexprs, **blocks, **options)
        return config

    return configs.launch(run, device, key, dict(C=channels))


def mhc_pre_forward(x, phi, alpha, bias, iters=20):
    """(x_in, h_post, h_res, y, r) of docs/ops.md §5 (y and r are what the backward reads)."""
    tokens, n, channels = x.shape
    coef = _coefficient_dtype(x, phi, alpha, bias)
    out_dtype = x.dtype  # x_in is returned in x's own dtype, also where x is read in float64 (float64 coefficients)
    x = x.to(_stream_dtype(x, (), coef)).contiguous()
    phi, alpha, bias = (t.to(coef).contiguous() for t in (phi, alpha, bias))
    m = n * n + 2 * n
    x_in = torch.empty(tokens, channels, dtype=x.dtype, device=x.device)
    h_post = torch.empty(tokens, n, dtype=coef, device=x.device)
    h_res = torch.empty(tokens, n, n, dtype=coef, device=x.device)
    y = torch.empty(tokens, m, dtype=coef, device=x.device)
    r = torch.empty(tokens, dtype=coef, device=x.device)
    if tokens:
        NP = padded_streams(n)
        _run(PRE_FWD, mhc_pre_fwd_kernel, lambda c: (triton.cdiv(tokens, c["BLOCK_T"]),), x.device, _key(x, n),
             channels, x, phi, alpha, bias, x_in, h_post, h_res, y, r, tokens, n, channels, iters,
             ACC=_acc(coef), DOT_PRECISION=_precision(x.dtype), NP=NP, WC=max(NP, 16))
    # Converted by torch, as the C++ kernel does (a no-op unless float64 coefficients widened x; Triton's
    # interpreter casts float64 to bfloat16 wrongly, so the kernel never stores float64 math as bfloat16).
    return x_in.to(out_dtype), h_post, h_res, y, r


def mhc_pre_backward(grad_x_in, grad_h_post, grad_h_res, x, phi, alpha, bias, y, r, iters=20):
    """(dx, dphi, dalpha, dbias)."""
    tokens, n, channels = x.shape
    dtypes = dict(x=x.dtype, phi=phi.dtype, alpha=alpha.dtype, bias=bias.dtype)
    coef = _coefficient_dtype(x, phi, alpha, bias)
    stream = _stream_dtype(x, (grad_x_in,), coef)
    x, grad_x_in = x.to(stream).contiguous(), grad_x_in.to(stream).contiguous()
    phi, alpha, bias, y, r, grad_h_post, grad_h_res = (
        t.to(coef).contiguous() for t in (phi, alpha, bias, y, r, grad_h_post, grad_h_res))
    m = n * n + 2 * n
    width = n * channels
    dx = torch.empty_like(x)
    if tokens == 0:
        return (dx.to(dtypes["x"]), torch.zeros_like(phi).to(dtypes["phi"]), torch.zeros_like(alpha).to(dtypes["alpha"]),
                torch.zeros_like(bias).to(dtypes["bias"]))
    NP = padded_streams(n)
    h_pre = torch.empty(tokens, n, dtype=coef, device=x.device)
    g_s = torch.empty(tokens, m, dtype=coef, device=x.device)
    through_r = torch.empty(tokens, dtype=coef, device=x.device)
    key = _key(x, n)

    def run_token(config):
        blocks, options = split_options(config)
        programs = triton.cdiv(tokens, blocks["BLOCK_T"])
        partials = torch.empty(programs, 3 + m, dtype=coef, device=x.device)  # per program: dalpha, dbias
        mhc_pre_bwd_token_kernel[(programs,)](grad_x_in, grad_h_post, grad_h_res, x, alpha, bias, y, r, h_pre, g_s,
                                              through_r, partials, tokens, n, channels, iters,
                                              ACC=_acc(coef), NP=NP, UNROLLED_ITERS=unrolled_iters(iters, coef),
                                              **blocks, **options)
        return partials

    partials = PRE_BWD_TOKEN.launch(run_token, x.device, key, dict(C=channels)).sum(0)

    def run_stream(config):
        blocks, options = split_options(config)
        column_blocks = triton.cdiv(width, blocks["BLOCK_K"])
        splits = _token_splits(x.device, column_blocks, triton.cdiv(tokens, blocks["BLOCK_T"]))
        per_split = triton.cdiv(triton.cdiv(tokens, splits), blocks["BLOCK_T"]) * blocks["BLOCK_T"]
        dphi_splits = torch.empty(splits, width, m, dtype=coef, device=x.device)
        mhc_pre_bwd_stream_kernel[(column_blocks, splits)](
            grad_x_in, x, phi, h_pre, g_s, through_r, dx, dphi_splits, tokens, n, channels, per_split,
            ACC=_acc(coef), DOT_PRECISION=_precision(x.dtype), NP=NP, WC=max(NP, 16), **blocks, **options)
        return dphi_splits

    dphi = PRE_BWD_STREAM.launch(run_stream, x.device, key, dict(C=channels)).sum(0)
    # copies: views of one buffer would alias two outputs of the op (opcheck and autograd refuse that)
    return (dx.to(dtypes["x"]), dphi.to(dtypes["phi"]), partials[:3].to(dtypes["alpha"], copy=True),
            partials[3:].to(dtypes["bias"], copy=True))


def _token_splits(device, column_blocks, token_blocks):
    """Token splits of the dphi reduction: enough programs to fill the GPU about four times over."""
    programs = 4 * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1)
    return max(1, min(token_blocks, triton.cdiv(programs, column_blocks)))


def mhc_post_forward(x, f_out, h_post, h_res):
    tokens, n, channels = x.shape
    coef = _coefficient_dtype(x, f_out, h_post, h_res)
    stream = _stream_dtype(x, (f_out,), coef)
    out_dtype = x.dtype
    x, f_out = x.to(stream).contiguous(), f_out.to(stream).contiguous()
    h_post, h_res = h_post.to(coef).contiguous(), h_res.to(coef).contiguous()
    out = torch.empty_like(x)
    if tokens:
        _run(POST_FWD, mhc_post_fwd_kernel, lambda c: (triton.cdiv(tokens, c["BLOCK_T"]),), x.device, _key(x, n),
             channels, x, f_out, h_post, h_res, out, tokens, n, channels, ACC=_acc(coef), NP=padded_streams(n))
    return out.to(out_dtype)


def mhc_post_backward(grad, x, f_out, h_post, h_res):
    """(dx, df_out, dh_post, dh_res)."""
    tokens, n, channels = x.shape
    dtypes = (x.dtype, f_out.dtype, h_post.dtype, h_res.dtype)
    coef = _coefficient_dtype(x, f_out, h_post, h_res)
    stream = _stream_dtype(x, (f_out, grad), coef)
    grad, x, f_out = grad.to(stream).contiguous(), x.to(stream).contiguous(), f_out.to(stream).contiguous()
    h_post, h_res = h_post.to(coef).contiguous(), h_res.to(coef).contiguous()
    grads = (torch.empty_like(x), torch.empty_like(f_out), torch.empty_like(h_post), torch.empty_like(h_res))
    if tokens:
        _run(POST_BWD, mhc_post_bwd_kernel, lambda c: (triton.cdiv(tokens, c["BLOCK_T"]),), x.device, _key(x, n),
             channels, grad, x, f_out, h_post, h_res, *grads, tokens, n, channels, ACC=_acc(coef), NP=padded_streams(n))
    return tuple(g.to(dtype) for g, dtype in zip(grads, dtypes))

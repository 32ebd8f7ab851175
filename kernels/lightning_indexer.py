"""Triton lightning indexer (DeepSeek Sparse Attention), forward, backward and fp8_quantize.

Forward: a program holds BLOCK_T queries with all their heads as one [BLOCK_T * HP, D] operand (HP = H
padded to a power of two, the padding rows zero) and walks its share of the key tiles [BLOCK_S, D]:
one tl.dot per tile (fp8 e4m3 operands on the tensor cores, fp32 accumulation), then relu, the
per-(query, head) weight, the sum over heads, the key's scale and the [ks, ke) mask. Tiles entirely
outside [min ks, max ke) of the block skip the matmul and only write -inf.

Backward (floating inputs), with r = q[t, h] . k[s], g[t, s] the masked output gradient:
    dweights[t, h] = sum_s g k_scale[s] relu(r)          dq[t, h] = sum_s g k_scale[s] w[t, h] [r > 0] k[s]
    dk_scale[s]    = sum_t g sum_h w[t, h] relu(r)       dk[s]    = sum_{t, h} g k_scale[s] w[t, h] [r > 0] q[t, h]
one kernel per query block (dq, dweights) and one per key block (dk, dk_scale), recomputing r, so
neither needs atomics. The exact dtypes' backward (float32 by FMA, float64 by DMMA: `ieee` matmuls)
reads q's and k's rows for r in 16-dim chunks (_scores) and, past 32 heads, takes the heads 32 at a
time (BLOCK_H: dq splits them over a second grid axis, dk loops over them), so that no thread holds a
whole reduction row over D or over 128 heads.
"""
import torch
import triton
import triton.language as tl

from .tuning import KernelConfigs, split_options

FP8_MAX = tl.constexpr(448.0)
AMAX_FLOOR = tl.constexpr(1e-4)  # DeepGEMM's floor (musetalk_fast/reference.py fp8_quantize)


@triton.jit
def _query_rows(pid_t, h0, T, H, HEADS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Rows m = t_local * HEADS + h of the block's queries and heads h0 .. h0 + HEADS: token, head, and
    whether the row is real (not past T or H)."""
    m = tl.arange(0, BLOCK_T * HEADS)
    token = pid_t * BLOCK_T + m // HEADS
    head = h0 + m % HEADS
    return token, head, (token < T) & (head < H)


@triton.jit
def _query_block(q_ptr, w_ptr, pid_t, h0, T, H, stride_qt, stride_qh, stride_wt,
                 HEADS: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, ACC: tl.constexpr):
    """The block's queries as rows m = t_local * HEADS + h (_query_rows): q [BLOCK_T * HEADS, D], weights
    [BLOCK_T * HEADS], and the rows' offsets into q (-1 for padding rows) for _scores."""
    token, head, ok = _query_rows(pid_t, h0, T, H, HEADS, BLOCK_T)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + tl.arange(0, D)[None, :],
                mask=ok[:, None], other=0.0)
    w = tl.load(w_ptr + token * stride_wt + head, mask=ok, other=0.0).to(ACC)
    return q, w, tl.where(ok, token * stride_qt + head * stride_qh, -1)


@triton.jit
def _key_range(ks_ptr, ke_ptr, pid_t, T, S, BLOCK_T: tl.constexpr):
    """Rows of the block, their [lo, hi) and the block's union [min lo, max hi) (empty for padding rows)."""
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    lo = tl.load(ks_ptr + rows, mask=rows < T, other=S)
    hi = tl.load(ke_ptr + rows, mask=rows < T, other=0)
    return rows, lo, hi, tl.min(lo, axis=0), tl.max(hi, axis=0)


@triton.jit
def _scores(a, b, a_ptr, a_rows, b_ptr, b_rows, D: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """r = a @ b^T in ACC for row tiles a [M, D] and b [N, D] (q and k, or k and q). fp8 x fp8 and
    bf16 x bf16 multiply the loaded tiles on the tensor cores. The exact dtypes (`ieee`: FMA float32,
    DMMA float64) read the same rows from memory (offsets a_rows, b_rows; -1 for a zero row) in 16-dim
    chunks and sum their products (the loaded tiles are then unused, and not loaded): a tl.dot over
    the whole D holds each thread's reduction row of both operands in registers, which spilled in the
    backward at D128 (8-392 B of stack, sm_90 report)."""
    if DOT_PRECISION == "ieee":
        r = tl.zeros((a_rows.shape[0], b_rows.shape[0]), ACC)
        for start in tl.range(0, D, 16):
            dims = start + tl.arange(0, 16)[None, :]
            a_c = tl.load(a_ptr + a_rows[:, None] + dims, mask=(a_rows >= 0)[:, None], other=0.0)
            b_c = tl.load(b_ptr + b_rows[:, None] + dims, mask=(b_rows >= 0)[:, None], other=0.0)
            r += tl.dot(a_c, tl.trans(b_c), input_precision="ieee", out_dtype=ACC)
        return r
    else:
        return tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION, out_dtype=ACC)


@triton.jit
def _indexer_tile(q, w, k_ptr, k_scale_ptr, cols, S, stride_k, lo, hi,
                  HP: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
                  ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Logits [BLOCK_T, BLOCK_S] of the key tile `cols`, -inf outside each row's [lo, hi)."""
    k = tl.load(k_ptr + cols[:, None] * stride_k + tl.arange(0, D)[None, :], mask=(cols < S)[:, None], other=0.0)
    r = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC)  # q @ k^T
    weighted = tl.maximum(r, 0.0) * w[:, None]  # relu, then the head's weight
    logits = tl.sum(tl.reshape(weighted, (BLOCK_T, HP, BLOCK_S)), axis=1)
    logits = logits * tl.load(k_scale_ptr + cols, mask=cols < S, other=0.0).to(ACC)[None, :]
    inside = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
    return tl.where(inside, logits, float("-inf"))


@triton.jit
def lightning_indexer_fwd_kernel(q_ptr, k_ptr, k_scale_ptr, w_ptr, ks_ptr, ke_ptr, out_ptr,
                                 T, S, H, stride_qt, stride_qh, stride_k, stride_wt, tiles_per_program,
                                 HP: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
                                 ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_t = tl.program_id(0)
    rows, lo, hi, block_lo, block_hi = _key_range(ks_ptr, ke_ptr, pid_t, T, S, BLOCK_T)
    q, w, _ = _query_block(q_ptr, w_ptr, pid_t, 0, T, H, stride_qt, stride_qh, stride_wt, HP, D, BLOCK_T, ACC)
    first_tile = tl.program_id(1) * tiles_per_program
    for tile in tl.range(first_tile, first_tile + tiles_per_program):
        cols = tile * BLOCK_S + tl.arange(0, BLOCK_S)
        out_offsets = rows[:, None].to(tl.int64) * S + cols[None, :]
        out_mask = (rows < T)[:, None] & (cols < S)[None, :]
        if (tile * BLOCK_S < block_hi) & (tile * BLOCK_S + BLOCK_S > block_lo):
            logits = _indexer_tile(q, w, k_ptr, k_scale_ptr, cols, S, stride_k, lo, hi,
                                   HP, D, BLOCK_T, BLOCK_S, ACC, DOT_PRECISION)
            tl.store(out_ptr + out_offsets, logits.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:  # a tile no query of the block sees: no matmul
            tl.store(out_ptr + out_offsets, tl.full((BLOCK_T, BLOCK_S), float("-inf"), out_ptr.dtype.element_ty),
                     mask=out_mask)


@triton.jit
def lightning_indexer_bwd_dq_kernel(grad_ptr, q_ptr, k_ptr, k_scale_ptr, w_ptr, ks_ptr, ke_ptr, dq_ptr, dw_ptr,
                                    T, S, H, stride_qt, stride_qh, stride_k, stride_wt,
                                    HP: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                                    BLOCK_S: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                    BLOCK_H: tl.constexpr = 0):
    """BLOCK_H > 0: program (i, j) makes the rows of heads j * BLOCK_H .. (j + 1) * BLOCK_H (each (t, h)
    row of dq and dweights is independent of the other heads); 0: all HP heads."""
    HEADS: tl.constexpr = BLOCK_H if BLOCK_H > 0 else HP
    pid_t = tl.program_id(0)
    h0 = tl.program_id(1) * BLOCK_H if BLOCK_H > 0 else 0
    rows, lo, hi, block_lo, block_hi = _key_range(ks_ptr, ke_ptr, pid_t, T, S, BLOCK_T)
    q, w, q_rows = _query_block(q_ptr, w_ptr, pid_t, h0, T, H, stride_qt, stride_qh, stride_wt, HEADS, D, BLOCK_T,
                                ACC)
    dq = tl.zeros((BLOCK_T * HEADS, D), dtype=ACC)
    dw = tl.zeros((BLOCK_T * HEADS,), dtype=ACC)
    for start in tl.range((block_lo // BLOCK_S) * BLOCK_S, block_hi, BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        k = tl.load(k_ptr + cols[:, None] * stride_k + tl.arange(0, D)[None, :], mask=(cols < S)[:, None], other=0.0)
        r = _scores(q, k, q_ptr, q_rows, k_ptr, tl.where(cols < S, cols * stride_k, -1), D, ACC, DOT_PRECISION)
        inside = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]) & (rows < T)[:, None]
        g = tl.load(grad_ptr + rows[:, None].to(tl.int64) * S + cols[None, :], mask=inside, other=0.0).to(ACC)
        g = g * tl.load(k_scale_ptr + cols, mask=cols < S, other=0.0).to(ACC)[None, :]
        g = tl.reshape(tl.broadcast_to(g[:, None, :], (BLOCK_T, HEADS, BLOCK_S)), (BLOCK_T * HEADS, BLOCK_S))
        positive = r > 0
        dw += tl.sum(tl.where(positive, g * r, 0.0), axis=1)
        p = tl.where(positive, g * w[:, None], 0.0)
        dq += tl.dot(p.to(k.dtype), k, input_precision=DOT_PRECISION, out_dtype=ACC)
    token, head, ok = _query_rows(pid_t, h0, T, H, HEADS, BLOCK_T)
    tl.store(dq_ptr + (token[:, None] * H + head[:, None]) * D + tl.arange(0, D)[None, :], dq, mask=ok[:, None])
    tl.store(dw_ptr + token * H + head, dw, mask=ok)


@triton.jit
def lightning_indexer_bwd_dk_kernel(grad_ptr, q_ptr, k_ptr, k_scale_ptr, w_ptr, ks_ptr, ke_ptr, dk_ptr, dks_ptr,
                                    T, S, H, stride_qt, stride_qh, stride_k, stride_wt,
                                    HP: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                                    BLOCK_S: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                    BLOCK_H: tl.constexpr = 0):
    """BLOCK_H > 0: each query block's heads in chunks of BLOCK_H (the sums over (t, h) are split over
    (t, h-chunk) matmuls: smaller [BLOCK_S, rows] tiles at 128 heads); 0: all HP at once."""
    HEADS: tl.constexpr = BLOCK_H if BLOCK_H > 0 else HP
    cols = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    k = tl.load(k_ptr + cols[:, None] * stride_k + tl.arange(0, D)[None, :], mask=(cols < S)[:, None], other=0.0)
    k_rows = tl.where(cols < S, cols * stride_k, -1)
    k_scale = tl.load(k_scale_ptr + cols, mask=cols < S, other=0.0).to(ACC)
    dk = tl.zeros((BLOCK_S, D), dtype=ACC)
    dks = tl.zeros((BLOCK_S,), dtype=ACC)
    tile_lo = tl.program_id(0) * BLOCK_S
    for pid_t in tl.range(0, tl.cdiv(T, BLOCK_T)):
        rows, lo, hi, block_lo, block_hi = _key_range(ks_ptr, ke_ptr, pid_t, T, S, BLOCK_T)
        if (tile_lo < block_hi) & (tile_lo + BLOCK_S > block_lo):
            for h0 in tl.range(0, HP, HEADS):  # one pass unless BLOCK_H splits the heads
                q, w, q_rows = _query_block(q_ptr, w_ptr, pid_t, h0, T, H, stride_qt, stride_qh, stride_wt, HEADS, D,
                                            BLOCK_T, ACC)
                r = _scores(k, q, k_ptr, k_rows, q_ptr, q_rows, D, ACC, DOT_PRECISION)  # [BLOCK_S, rows]
                inside = (cols[:, None] >= lo[None, :]) & (cols[:, None] < hi[None, :]) & (rows < T)[None, :]
                g = tl.load(grad_ptr + rows[None, :].to(tl.int64) * S + cols[:, None], mask=inside, other=0.0).to(ACC)
                g = tl.reshape(tl.broadcast_to(g[:, :, None], (BLOCK_S, BLOCK_T, HEADS)), (BLOCK_S, BLOCK_T * HEADS))
                gw = tl.where(r > 0, g * w[None, :], 0.0)
                dks += tl.sum(gw * r, axis=1)
                dk += tl.dot((gw * k_scale[:, None]).to(q.dtype), q, input_precision=DOT_PRECISION, out_dtype=ACC)
    tl.store(dk_ptr + cols[:, None] * D + tl.arange(0, D)[None, :], dk, mask=(cols < S)[:, None])
    tl.store(dks_ptr + cols, dks, mask=cols < S)


@triton.jit
def fp8_quantize_kernel(x_ptr, out_ptr, scale_ptr, blocks, size,
                        UE8M0: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK: tl.constexpr):
    """BLOCK_R quantisation blocks of `size` contiguous values: amax over chunks, then the scaled cast."""
    b = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    base = b.to(tl.int64)[:, None] * size
    amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in tl.range(0, size, CHUNK):
        i = start + tl.arange(0, CHUNK)[None, :]
        mask = (b[:, None] < blocks) & (i < size)
        x = tl.load(x_ptr + base + i, mask=mask, other=0.0).to(tl.float32)  # float64 as the reference's x.float()
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), FP8_MAX)
    if UE8M0:  # round up to a power of two: bump the exponent unless the mantissa bits are all zero
        bits = scale.to(tl.int32, bitcast=True)
        bits = tl.where((bits & 0x7FFFFF) == 0, bits, (bits & 0x7F800000) + 0x800000)
        scale = bits.to(tl.float32, bitcast=True)
    tl.store(scale_ptr + b, scale, mask=b < blocks)
    for start in tl.range(0, size, CHUNK):
        i = start + tl.arange(0, CHUNK)[None, :]
        mask = (b[:, None] < blocks) & (i < size)
        x = tl.load(x_ptr + base + i, mask=mask, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -FP8_MAX), FP8_MAX)
        tl.store(out_ptr + base + i, y.to(out_ptr.dtype.element_ty), mask=mask)


# Launch configs --------------------------------------------------------------------------------


def _indexer_heuristic(kind):
    """About 128 (query, head) rows per program: the M of one Hopper wgmma pair; key tiles of 128. Where the
    sm_90 compile report showed a stack frame at fp8/bf16/fp16 the tiles shrink (not yet measured on a
    GPU; every choice below compiles without a stack there): with few heads (HP < 32) a block holds many
    queries, whose [BLOCK_T, BLOCK_S] logits and gradients take 64-key tiles (fwd, dq; dq also 64 rows at
    H1); the dk kernel keeps dK [BLOCK_S, D] and a [BLOCK_S, rows] score tile resident: 64 rows x 64
    keys, 32 keys over 4 warps at H128.
    The exact fp32/fp64 paths (FMA and DMMA matmuls, no wgmma) take 32 rows: the forward 32 keys, 16
    past 32 heads; the backward 32 keys at every H (float32 dq 16: at 32 it sat at 128 registers and
    spilled 8 B at H1), past 32 heads in chunks of 32 (BLOCK_H: dq splits them over programs, dk
    loops over them), so that its matmuls over the rows (dK += (g w) q) and its dQ tile stay 32 rows:
    with all 64 or 128 heads at once they spilled 8-392 B (sm_90 report)."""
    def heuristic(match):
        hp = match["HP"]
        if match["dtype"] not in ("fp8", "bf16", "fp16"):
            if kind == "fwd":
                block_s = 32 if hp <= 32 else 16
                return dict(BLOCK_T=max(1, 32 // hp), BLOCK_S=block_s, num_warps=8, num_stages=2 if block_s == 32 else 1)
            heads = dict(BLOCK_H=32) if hp > 32 else {}
            block_s = 16 if kind == "dq" and match["dtype"] == "fp32" else 32
            return dict(BLOCK_T=max(1, 32 // hp), BLOCK_S=block_s, **heads, num_warps=8, num_stages=2)
        if kind == "dk":
            rows, block_s, warps = max(64, hp), 64 if hp <= 64 else 32, 8 if hp <= 64 else 4
        else:
            rows, block_s, warps = 64 if kind == "dq" and hp == 1 else 128, 128 if hp >= 32 else 64, 8
        return dict(BLOCK_T=max(1, rows // hp), BLOCK_S=block_s, num_warps=warps, num_stages=3)

    return heuristic


def _indexer_smallest(match):
    """tl.dot needs at least 16 rows and 16 columns."""
    return dict(BLOCK_T=max(1, 16 // match["HP"]), BLOCK_S=16, num_warps=4, num_stages=1)


def _indexer_space(match):
    rows = [r for r in (64, 128, 256) if r >= match["HP"]]
    return [dict(BLOCK_T=max(1, r // match["HP"]), BLOCK_S=s, num_warps=w, num_stages=st)
            for r in rows for s in (64, 128) for w in (4, 8) for st in (2, 3)]


def _element_bytes(match):
    return {"fp8": 1, "fp64": 8, "fp32": 4}.get(match["dtype"], 2)


def _indexer_shared(config, match):
    """q block resident plus num_stages key tiles."""
    rows = config["BLOCK_T"] * config.get("BLOCK_H", match["HP"])
    return (rows + config.get("num_stages", 1) * config["BLOCK_S"]) * match["D"] * _element_bytes(match)


def _indexer_configs(name, kind):
    return KernelConfigs(name, space=_indexer_space, heuristic=_indexer_heuristic(kind), smallest=_indexer_smallest,
                         shared=_indexer_shared)


FWD = _indexer_configs("lightning_indexer_fwd", "fwd")
BWD_DQ = _indexer_configs("lightning_indexer_bwd_dq", "dq")
BWD_DK = _indexer_configs("lightning_indexer_bwd_dk", "dk")
QUANTIZE = KernelConfigs("fp8_quantize", space=[dict(BLOCK_R=r, CHUNK=c, num_warps=w) for r in (1, 4, 16)
                                                for c in (128, 512) for w in (2, 4)],
                         heuristic=lambda match: dict(BLOCK_R=4, CHUNK=128, num_warps=4),
                         smallest=lambda match: dict(BLOCK_R=4, CHUNK=128, num_warps=4))

# Launchers -------------------------------------------------------------------------------------

DTYPE_NAMES = {torch.float8_e4m3fn: "fp8", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.float64: "fp64"}


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def prepare_inputs(q, k, k_scale, weights, ks, ke):
    """q and k in one dtype (both converted to float32, or float64, when they differ: exact for fp8/bf16/fp16),
    the last dim contiguous; the rest contiguous. Returns them with the compute dtype."""
    acc = torch.float64 if torch.float64 in (q.dtype, k.dtype, k_scale.dtype, weights.dtype) else torch.float32
    if q.dtype != k.dtype or acc == torch.float64:
        q, k = q.to(acc), k.to(acc)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    return q, k, k_scale.contiguous(), weights.contiguous(), ks.contiguous(), ke.contiguous(), acc


def _dot_precision(dtype):
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _match(q, heads):
    return dict(dtype=DTYPE_NAMES[q.dtype], HP=max(triton.next_power_of_2(heads), 1), D=q.shape[-1])


def _indexer_args(q, k, k_scale, weights, ks, ke):
    T, H, _ = q.shape
    return (k_scale, weights, ks, ke), (T, k.shape[0], H, q.stride(0), q.stride(1), k.stride(0), weights.stride(0))


def _programs_to_fill(device):
    """About four programs per SM keep the GPU busy. The interpreter takes 4, so that its small tests also
    run the key tiles split over several programs."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def lightning_indexer_forward(q, k, k_scale, weights, ks, ke):
    q, k, k_scale, weights, ks, ke, acc = prepare_inputs(q, k, k_scale, weights, ks, ke)
    T, H, D = q.shape
    S = k.shape[0]
    out = torch.empty((T, S), dtype=acc, device=q.device)
    if T == 0 or S == 0:
        return out
    match = _match(q, H)
    (k_scale, weights, ks, ke), sizes = _indexer_args(q, k, k_scale, weights, ks, ke)

    def run(config):
        constexprs, options = split_options(config)
        query_blocks = triton.cdiv(T, config["BLOCK_T"])
        key_tiles = triton.cdiv(S, config["BLOCK_S"])
        # Split the key tiles over programs only when there are too few query blocks to fill the GPU.
        splits = min(key_tiles, max(1, triton.cdiv(_programs_to_fill(q.device), query_blocks)))
        tiles_per_program = triton.cdiv(key_tiles, splits)
        grid = (query_blocks, triton.cdiv(key_tiles, tiles_per_program))
        return lightning_indexer_fwd_kernel[grid](q, k, k_scale, weights, ks, ke, out, *sizes, tiles_per_program,
                                           HP=match["HP"], D=D, ACC=_acc(acc), DOT_PRECISION=_dot_precision(q.dtype),
                                           **constexprs, **options)

    FWD.launch(run, q.device, match, dict(S=S))
    return out


def lightning_indexer_backward(grad, q, k, k_scale, weights, ks, ke):
    """(dq, dk, dk_scale, dweights) in the compute dtype."""
    q, k, k_scale, weights, ks, ke, acc = prepare_inputs(q, k, k_scale, weights, ks, ke)
    T, H, D = q.shape
    S = k.shape[0]
    grad = grad.to(acc).contiguous()
    dq = torch.zeros((T, H, D), dtype=acc, device=q.device)
    dk = torch.zeros((S, D), dtype=acc, device=q.device)
    dks = torch.zeros((S,), dtype=acc, device=q.device)
    dw = torch.zeros((T, H), dtype=acc, device=q.device)
    if T == 0 or S == 0:
        return dq, dk, dks, dw
    match = _match(q, H)
    (k_scale, weights, ks, ke), sizes = _indexer_args(q, k, k_scale, weights, ks, ke)
    common = dict(HP=match["HP"], D=D, ACC=_acc(acc), DOT_PRECISION=_dot_precision(q.dtype))

    def run_dq(config):
        constexprs, options = split_options(config)
        head_blocks = match["HP"] // config.get("BLOCK_H", match["HP"])  # BLOCK_H: heads split over programs
        return lightning_indexer_bwd_dq_kernel[(triton.cdiv(T, config["BLOCK_T"]), head_blocks)](
            grad, q, k, k_scale, weights, ks, ke, dq, dw, *sizes, **common, **constexprs, **options)

    def run_dk(config):
        constexprs, options = split_options(config)
        return lightning_indexer_bwd_dk_kernel[(triton.cdiv(S, config["BLOCK_S"]),)](
            grad, q, k, k_scale, weights, ks, ke, dk, dks, *sizes, **common, **constexprs, **options)

    BWD_DQ.launch(run_dq, q.device, match, dict(S=S))
    BWD_DK.launch(run_dk, q.device, match, dict(T=T))
    return dq, dk, dks, dw


def fp8_quantize(x, block=None, ue8m0=False):
    dim = x.shape[-1]
    size = dim if block is None else block
    x_c = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale_shape = x.shape[:-1] if size == dim else (*x.shape[:-1], dim // size)
    scale = torch.empty(scale_shape, dtype=torch.float32, device=x.device)
    blocks = x.numel() // size if size else 0
    if blocks == 0:
        return out, scale

    def run(config):
        constexprs, options = split_options(config)
        chunk = min(constexprs.pop("CHUNK"), max(triton.next_power_of_2(size), 16))
        return fp8_quantize_kernel[(triton.cdiv(blocks, config["BLOCK_R"]),)](
            x_c, out, scale, blocks, size, UE8M0=ue8m0, CHUNK=chunk, **constexprs, **options)

    QUANTIZE.launch(run, x.device, dict(dtype=DTYPE_NAMES[x.dtype]), dict(size=size))
    return out, scale

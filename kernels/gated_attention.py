"""Triton sigmoid-gated SDPA (Qwen gated attention G1), forward and backward, dense and varlen.

Forward: FlashAttention-2 online softmax over key blocks; the epilogue multiplies the normalised
output by sigmoid(gate) before its one store, and saves the row log-sum-exp. Causal: the query
blocks run longest first (the program id along the query axis is reversed), so the last wave is not
a tail of long blocks behind short ones.

Backward (docs/ops.md §4), FlashAttention-2/3's shape: with Y = O * s, s = sigmoid(gate), no
pre-gate O is needed:
    dO = dY * s,   delta = rowsum(dO * O) = rowsum(dY * Y),   dgate = dY * Y * (1 - s).
1. `gated_attention_bwd_preprocess_kernel` (one memory-bound pass): delta and dgate.
2. `gated_attention_bwd_kernel`: one program per (KV head, key block) loops over its group's query
   heads and query blocks; dO = dY * s is formed as dY and the gate are loaded. Per block it computes
   S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T = P^T * (dP^T - delta), dK += dS^T Q and,
   by default, dQ += dS K added with fp32 atomics into an fp32 buffer (5 matmuls per block; the
   split dK/dV + dQ design needs 7), computed as dQ^T = K^T dS^T so that the head dim is the wgmma's M. Causal key blocks run in ascending order, which is longest
   first (key block 0 is seen by every query).
3. Deterministic mode (`deterministic=True`): the same kernel without the dQ matmul and atomics,
   then `gated_attention_bwd_dq_kernel` (one program per query block, a fixed summation order)
   recomputes S and dP for dQ: 7 matmuls per block, no fp32 dQ buffer.

Exact dtypes (float32 by FMA, float64 by DMMA: `ieee` matmuls) and the pointer path at D > 128: the
backward can split the head dim (SPLIT_D, a third grid axis): each program makes SPLIT_D columns of
dK, dV and dQ and sums S^T and dP^T over the whole head dim chunk by chunk from memory, so only
[BLOCK_N, SPLIT_D] of K, dK and dV stay resident; (2 D / SPLIT_D + 3) block matmuls instead of 5. Their
forward and dQ kernels sum the score matmuls over chunks of 16 dims (_dot_over_d). Without both, these
paths kept 16-11000 B of stack frame (spilled registers) at any tile (sm_90 report).

Data movement: where the layout allows (last dim contiguous, 16-byte aligned strides and base) the
Q/K/V/dY tiles are loaded, and the O/dK/dV tiles stored, through tensor descriptors
(tl.make_tensor_descriptor: TMA on Hopper), whose bounds checks are the hardware's; elsewhere
(e.g. D * itemsize not a multiple of 16) through masked pointer loads. The backward's Q, dY and gate
sources cover the whole GQA group (3-D descriptors made once per program, not once per head). An
element-wise gate is read like Q when it meets the same rules, else by pointers; a head-wise gate
(one value per row) as a [BLOCK_M] column. Loops are software-pipelined by tl.range with
the config's num_stages. Warp specialization is not used: Triton 3.6 compiles the forward loop with
tl.range(..., warp_specialize=True) for sm_90 to the same code (no partitions, no setmaxnreg, at 4 or
8 warps); its automatic partitioning targets Blackwell.

Layouts: any strides (the [B, L, H, D].transpose(1, 2) view runs without a copy). Varlen: packed
[T, H, D] tensors, sequence b at rows cu_seqlens[b]:cu_seqlens[b + 1], each tensor addressed as
(batch stride 0, head stride, row stride, dim stride) plus the sequence's first row. Causal masking
is top-left (key s <= query l) within each sequence.
"""
import torch
import triton
import triton.language as tl

from .float64_scalars import exact_scalar, float64_scalars
from .tuning import KernelConfigs, split_options

LOG2E = 1.4426950408889634
LOG2E_ = tl.constexpr(LOG2E)  # the same constant inside kernels


def _attention_space(shapes, warps, stages):
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n in shapes for w in warps for st in stages]




def _element_bytes(match):
    return {"fp64": 8, "fp32": 4}.get(match["dtype"], 2)


def _exact(match):
    """float32 and float64 run the exact paths: `ieee` matmuls (FMA for float32, DMMA for float64), not
    the tensor-core TF32/16-bit ones."""
    return match["dtype"] in ("fp32", "fp64")


def _attention_heuristic(fast_config, exact_config):
    """fast_config(match) for 2-byte dtypes, exact_config(match) for float32 and float64: small tiles
    chosen from the sm_90 compile report (no stack frame at D 16-256, either path). KernelConfigs
    shrinks each to the GPU's shared memory."""
    def heuristic(match):
        return exact_config(match) if _exact(match) else fast_config(match)

    return heuristic


def _exact_fwd_config(match):
    """The scores sum over D in chunks of 16 (_dot_over_d). float32: 32 x 16 tiles at D <= 128 (64-row
    blocks kept 48-1352 B of stack at D >= 128), 16 x 16 at D256; float64 16 x 16."""
    rows = 32 if match["dtype"] == "fp32" and match["D"] <= 128 else 16
    return _tiles((rows, 16, 8, 2))


def _exact_bwd_config(match):
    """The head-dim-split backward (SPLIT_D): 16 x 16 tiles, 8 warps; float32 in 32-dim chunks, float64
    in 16-dim ones (32 kept 80-96 B of stack). Unsplit, a float32 [16, D] tile per resident tensor kept
    16-560 B of stack at D >= 64, float64 120-11000 B at every D."""
    return dict(_tiles((16, 16, 8, 1)), SPLIT_D=_split_d(match, 32 if match["dtype"] == "fp32" else 16))


def _split_d(match, width):
    return min(width, match["D"])


def _exact_dq_config(match):
    """As the forward: float32 32 x 16 at D <= 128, else 16 x 16 (64-row blocks: 1040 B of stack at D128)."""
    return _exact_fwd_config(match)


def _smallest(match):
    return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)


def _bwd_smallest(match):
    """The exact dtypes' backward is always head-dim split (the interpreter runs this config)."""
    return dict(_smallest(match), SPLIT_D=_split_d(match, 16)) if _exact(match) else _smallest(match)


def _tiles(config):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) -> a config dict."""
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), config))


# The heuristics are keyed on (D, causal) and on match["tma"]: whether every tile goes through a tensor
# descriptor (Hopper, aligned layouts; the gate too, or head-wise). The pointer path (pre-Hopper GPUs,
# misaligned views) holds a 64-bit address per element of each tile it loads and needs smaller tiles:
# the descriptor configs spilled 120-1700 B there (sm_90 report). All from the compile report, not
# yet measured: no stack frame at bf16/fp16 D64, D128, D256, either path.

def _fwd_config(match):
    """Descriptors: the old kernel's H100 winner at D128 full (128x128, 8 warps, 3 stages); causal
    takes 128-row query blocks too (the old 64x64 pick halved the work per K/V tile load); D256 64x64
    (128-row blocks take all 255 registers)."""
    if not match.get("tma", True):
        return _tiles((128, 64, 8, 3) if match["D"] <= 64 else (128, 32, 8, 3) if match["D"] <= 128 else (64, 16, 8, 2))
    if match["D"] <= 64:
        return _tiles((128, 64, 4, 3))
    if match["D"] > 128:
        return _tiles((64, 64, 8, 2))
    return _tiles((128, 64, 8, 3) if match["causal"] else (128, 128, 8, 3))


def _bwd_config(match):
    """The fused backward keeps a key block's K, V (shared memory) and dK, dV (fp32 registers)
    resident: 128-key blocks (half the dQ atomics of 64) against 32-row query blocks at D <= 64 (two
    stages: the next query block's tiles load during this one's matmuls), 16-row ones at D128, 16 x 32
    at D256; 8 warps. Registers (descriptors): D64 193-216, D128 220-230, D256 194-252. D128 with
    32-row blocks, or pipelined, spilled 8-104 B; D256 with 64-key blocks 130-650 B in every variant
    tried (gate by descriptor or per row, dV and dK in two passes, dQ by a separate kernel). The pointer
    path at D256 kept a 40-64 B stack frame even at 16 x 16 tiles; split into 64-dim chunks (SPLIT_D) it
    takes 16 x 64 tiles at 205-209 registers, no stack, for 2.2x the matmul work (S^T and dP^T are made
    once per chunk: 2 x 4 + 3 block matmuls instead of 5); not yet measured against the unsplit 16 x 16."""
    if match["D"] <= 64:
        return _tiles((32, 128, 8, 2))
    if not match.get("tma", True):
        return _tiles((16, 32, 8, 1)) if match["D"] <= 128 else dict(_tiles((16, 64, 8, 1)), SPLIT_D=64)
    return _tiles((16, 128, 8, 1) if match["D"] <= 128 else (16, 32, 8, 1))


def _dq_config(match):
    """Deterministic mode's dQ kernel: 128 x 64, 8 warps, 3 stages (shrunk to the shared memory at
    D256); the pointer path 32 x 64 at D128, 32 x 32 at D256."""
    if not match.get("tma", True) and match["D"] > 64:
        return _tiles((32, 64, 8, 2) if match["D"] <= 128 else (32, 32, 8, 2))
    return _tiles((128, 64, 8, 3))


# Search spaces the tuner times (bench/tune.py), heuristics for keys no table has, and shared-memory
# estimates: tiles resident for the whole loop plus `num_stages` copies of the pipelined ones.
FWD = KernelConfigs(
    "gated_attention_fwd",
    space=[c for c in _attention_space([(128, 64), (128, 128), (64, 64), (128, 32)], (4, 8), (2, 3, 4))
           if c["BLOCK_N"] * c["num_stages"] < 512],  # 128x128 in 4 stages: 289 KB of shared memory at D128
    heuristic=_attention_heuristic(_fwd_config, _exact_fwd_config),
    smallest=_smallest,
    shared=lambda c, match: (c["BLOCK_M"] + 2 * c["num_stages"] * c["BLOCK_N"]) * match["D"] * _element_bytes(match),
)
BWD = KernelConfigs(  # the fused dK/dV(/dQ) kernel: K, V resident, Q, dY, gate pipelined
    "gated_attention_bwd",
    space=lambda match: [dict(c, SPLIT_D=_split_d(match, width)) for c in _attention_space([(16, 16), (32, 16), (16, 32)],
                                                                                          (4, 8), (1,))
                         for width in (16, 32)] if _exact(match) else _attention_space(
        [(16, 128), (32, 128), (64, 128), (64, 64), (32, 64), (16, 64), (16, 32)], (4, 8), (1, 2)) + (
        [dict(c, SPLIT_D=64) for c in _attention_space([(16, 64), (32, 64), (16, 128)], (8,), (1,))]
        if match["D"] > 128 and not match.get("tma", True) else []),
    heuristic=_attention_heuristic(_bwd_config, _exact_bwd_config),
    smallest=_bwd_smallest,
    shared=lambda c, match: (2 * c["BLOCK_N"] + 3 * c["num_stages"] * c["BLOCK_M"]) * match["D"] * _element_bytes(match),
)
DQ = KernelConfigs(  # deterministic mode's dQ kernel
    "gated_attention_bwd_dq",
    space=_attention_space([(128, 32), (128, 64), (64, 64), (64, 32)], (4, 8), (2, 3)),
    heuristic=_attention_heuristic(_dq_config, _exact_dq_config),
    smallest=_smallest,
    shared=lambda c, match: (3 * c["BLOCK_M"] + 2 * c["num_stages"] * c["BLOCK_N"]) * match["D"] * _element_bytes(match),
)
PREPROCESS = KernelConfigs(
    "gated_attention_bwd_preprocess",
    space=[dict(BLOCK_M=m, num_warps=w) for m in (32, 64, 128) for w in (4, 8)],
    # 8 warps, 32 rows when a row passes 1 KB: 4 warps or wider tiles took 225-255 registers (sm_90 report)
    heuristic=lambda match: dict(BLOCK_M=32 if match["D"] * _element_bytes(match) > 1024 else 64, num_warps=8),
    smallest=lambda match: dict(BLOCK_M=16, num_warps=4),
)


@triton.jit
def _load_tile(base, rows, n_rows, stride_row, stride_d, dims,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """A [len(rows), BLOCK_D] tile by pointers, zero past n_rows and HEAD_DIM. Bounds checks only
    where needed: CHECK_ROWS is off for blocks known to be in range, and the D check vanishes when
    BLOCK_D == D."""
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
def _rows_source(base, n_rows, stride_row, BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """What tiles of an [n_rows, HEAD_DIM] matrix (row stride stride_row, unit dim stride) are read
    from: a tensor descriptor (TMA; zero fill and clipping past the edges) or the base pointer."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride_row, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_D])
    else:
        return base


@triton.jit
def _load_rows(source, start, n_rows, stride_row, stride_d, dims, BLOCK_ROWS: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [start, start + BLOCK_ROWS) of a _rows_source, zero past its edges."""
    if USE_TMA:
        return source.load([start, 0])
    else:
        return _load_tile(source, start + tl.arange(0, BLOCK_ROWS), n_rows, stride_row, stride_d, dims,
                          HEAD_DIM, BLOCK_D, CHECK_ROWS)


@triton.jit
def _store_rows(source, start, n_rows, stride_row, value, dims, BLOCK_ROWS: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """Store rows [start, start + BLOCK_ROWS) of a _rows_source (unit dim stride), clipped at its edges."""
    if USE_TMA:
        source.store([start, 0], value)
    else:
        rows = start + tl.arange(0, BLOCK_ROWS)
        ptrs = source + rows[:, None] * stride_row + dims[None, :]
        if BLOCK_D == HEAD_DIM:
            tl.store(ptrs, value, mask=(rows < n_rows)[:, None])
        else:
            tl.store(ptrs, value, mask=(rows < n_rows)[:, None] & (dims < HEAD_DIM)[None, :])


@triton.jit
def _heads_source(base, n_heads, n_rows, stride_h, stride_row, BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """_rows_source over n_heads heads at once ([n_heads, n_rows, HEAD_DIM], head stride stride_h): one
    tensor descriptor for a whole GQA group, made once per program rather than once per head."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[n_heads, n_rows, HEAD_DIM], strides=[stride_h, stride_row, 1],
                                         block_shape=[1, BLOCK_ROWS, BLOCK_D])
    else:
        return base


@triton.jit
def _load_head_rows(source, head, start, n_rows, stride_h, stride_row, stride_d, dims, BLOCK_ROWS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [start, start + BLOCK_ROWS) of head `head` of a _heads_source, zero past its edges."""
    if USE_TMA:
        return source.load([tl.cast(head, tl.int32), start, 0]).reshape(BLOCK_ROWS, BLOCK_D)
    else:
        return _load_tile(source + tl.cast(head, tl.int64) * stride_h, start + tl.arange(0, BLOCK_ROWS), n_rows, stride_row,
                          stride_d, dims, HEAD_DIM, BLOCK_D, True)


@triton.jit
def _gate_sigmoid(g_src, head, start, n_rows, stride_h, stride_row, stride_d, dims, ACC: tl.constexpr,
                  BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_WISE_GATE: tl.constexpr, GATE_TMA: tl.constexpr):
    """sigmoid(gate) of rows [start, start + BLOCK_ROWS) of head `head` of a _heads_source, in ACC: a
    [BLOCK_ROWS, BLOCK_D] tile (by a tensor descriptor when GATE_TMA, else by pointers), or for a
    head-wise gate (one value per row, expanded with dim stride 0) a [BLOCK_ROWS, 1] column: 1/D of the
    loads and of the sigmoids."""
    if HEAD_WISE_GATE:
        rows = start + tl.arange(0, BLOCK_ROWS)
        gate = tl.load(g_src + tl.cast(head, tl.int64) * stride_h + rows * stride_row, mask=rows < n_rows, other=0.0)
        return tl.sigmoid(gate.to(ACC))[:, None]
    else:
        gate = _load_head_rows(g_src, head, start, n_rows, stride_h, stride_row, stride_d, dims, BLOCK_ROWS, HEAD_DIM,
                               BLOCK_D, GATE_TMA)
        return tl.sigmoid(gate.to(ACC))


@triton.jit
def _sequence(Cu, b, dense_len, VARLEN: tl.constexpr):
    """(first row, length) of sequence b: rows Cu[b]:Cu[b + 1] of a packed tensor, else 0:dense_len."""
    if VARLEN:
        start = tl.load(Cu + b).to(tl.int64)
        length = (tl.load(Cu + b + 1) - tl.load(Cu + b)).to(tl.int32)
    else:
        start = tl.zeros([], tl.int64)
        length = dense_len
    return start, length


@triton.jit
def _dot_over_d(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b^T for a [M, D], b [N, D]: the matmuls that sum over the head dim (scores, dP). The exact
    paths (`ieee`: FMA, no tensor cores) run it as a batched dot over chunks of 16 dims summed after:
    Triton's FMA lowering holds a thread's whole reduction row of both operands in registers, which
    spilled at every tile at D >= 64 (sm_90 report)."""
    if DOT_PRECISION == "ieee":
        CHUNK: tl.constexpr = 16
        chunks: tl.constexpr = a.shape[1] // CHUNK
        a3 = tl.permute(tl.reshape(a, [a.shape[0], chunks, CHUNK]), [1, 0, 2])  # [chunks, M, CHUNK]
        b3 = tl.permute(tl.reshape(b, [b.shape[0], chunks, CHUNK]), [1, 2, 0])  # [chunks, CHUNK, N]
        return tl.sum(tl.dot(a3, b3, input_precision=DOT_PRECISION), axis=0)
    else:
        return tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION)


@triton.jit
def _key_block(q, k_src, v_src, sk_s, sk_d, sv_s, sv_d, rows, dims, start_n, S, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """The key block at start_n: (k, v, base-2 scores [BLOCK_M, BLOCK_N]), scores -inf where masked."""
    k = _load_rows(k_src, start_n, S, sk_s, sk_d, dims, BLOCK_N, HEAD_DIM, BLOCK_D, MASKED, USE_TMA)
    v = _load_rows(v_src, start_n, S, sv_s, sv_d, dims, BLOCK_N, HEAD_DIM, BLOCK_D, MASKED, USE_TMA)
    scores = _dot_over_d(q, k, DOT_PRECISION) * qk_scale
    if MASKED:
        keys = start_n + tl.arange(0, BLOCK_N)
        allowed = (keys < S)[None, :]
        if IS_CAUSAL:
            allowed = allowed & (keys[None, :] <= rows[:, None])
        scores = tl.where(allowed, scores, float("-inf"))
    return k, v, scores


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_src, v_src, sk_s, sk_d, sv_s, sv_d, rows, dims, lo, hi, S, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Online softmax over key blocks [lo, hi): FlashAttention-2's running max m_i and sum l_i."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        k, v, scores = _key_block(q, k_src, v_src, sk_s, sk_d, sv_s, sv_d, rows, dims, start_n, S, qk_scale,
                                  HEAD_DIM, BLOCK_D, IS_CAUSAL, DOT_PRECISION, BLOCK_N, MASKED, USE_TMA)
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
    Q, K, V, G, Out, Lse, CuQ, CuK,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sv_b, sv_h, sv_s, sv_d,
    sg_b, sg_h, sg_l, sg_d,
    so_b, so_h, so_l,
    sl_b, sl_h,
    H, L, S, GROUP, qk_scale,  # qk_scale = scale * log2(e): the softmax runs in base 2
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr, HAS_GATE: tl.constexpr = True,
    VARLEN: tl.constexpr = False, USE_TMA: tl.constexpr = False, HEAD_WISE_GATE: tl.constexpr = False,
    GATE_TMA: tl.constexpr = False, QK_SCALE_F64: tl.constexpr = None,
):
    """Grid (sequences * Hq, query blocks). Lse rows have unit stride; Out has unit dim stride."""
    qk_scale = exact_scalar(qk_scale, QK_SCALE_F64, ACC)  # float64: exact (a float argument is float32 on a GPU)
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit base offsets: tensors may pass 2^31 elements
    if IS_CAUSAL:  # longest query blocks (most keys) first
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kv_h = h // GROUP
    q_start, L = _sequence(CuQ, b, L, VARLEN)
    k_start, S = _sequence(CuK, b, S, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= L:  # varlen: a sequence shorter than the longest
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_src = _rows_source(Q + b * sq_b + h * sq_h + q_start * sq_l, L, sq_l, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
    k_src = _rows_source(K + b * sk_b + kv_h * sk_h + k_start * sk_s, S, sk_s, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    v_src = _rows_source(V + b * sv_b + kv_h * sv_h + k_start * sv_s, S, sv_s, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    q = _load_rows(q_src, start_m, L, sq_l, sq_d, dims, BLOCK_M, HEAD_DIM, BLOCK_D, True, USE_TMA)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    full_hi, hi = _key_ranges(start_m, S, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, sk_s, sk_d, sv_s, sv_d, rows, dims, 0, full_hi,
                               S, qk_scale, HEAD_DIM, BLOCK_D, IS_CAUSAL, DOT_PRECISION, BLOCK_N, False, USE_TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, sk_s, sk_d, sv_s, sv_d, rows, dims, full_hi, hi,
                               S, qk_scale, HEAD_DIM, BLOCK_D, IS_CAUSAL, DOT_PRECISION, BLOCK_N, True, USE_TMA)

    # Epilogue: normalise, gate, store once. A row with no key (S = 0) gives 0 and lse = -inf.
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if HAS_GATE:
        g_src = _heads_source(G + b * sg_b + q_start * sg_l, H, L, sg_h, sg_l, BLOCK_M, HEAD_DIM, BLOCK_D, GATE_TMA)
        out = out * _gate_sigmoid(g_src, h, start_m, L, sg_h, sg_l, sg_d, dims, ACC, BLOCK_M, HEAD_DIM, BLOCK_D,
                                  HEAD_WISE_GATE, GATE_TMA)
    o_src = _rows_source(Out + b * so_b + h * so_h + q_start * so_l, L, so_l, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
    _store_rows(o_src, start_m, L, so_l, out.to(Out.dtype.element_ty), dims, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) / LOG2E_, float("-inf"))
    tl.store(Lse + b * sl_b + h * sl_h + q_start + rows, lse, mask=rows < L)


@triton.jit
def gated_attention_bwd_preprocess_kernel(
    dY, Y, G, Delta, dG, CuQ,
    sdy_b, sdy_h, sdy_l, sdy_d,
    sy_b, sy_h, sy_l, sy_d,
    sg_b, sg_h, sg_l, sg_d,
    sdg_b, sdg_h, sdg_l,
    sl_b, sl_h,
    H, L,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_WISE_GATE: tl.constexpr, BLOCK_M: tl.constexpr,
    ACC: tl.constexpr, VARLEN: tl.constexpr = False,
):
    """delta = rowsum(dY * Y); dgate = dY * Y * (1 - sigmoid(gate)), summed over D if head-wise.
    Grid (sequences * Hq, row blocks); dG has unit dim stride, Delta unit row stride."""
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit base offsets: tensors may pass 2^31 elements
    b = pid_bh // H
    h = pid_bh % H
    q_start, L = _sequence(CuQ, b, L, VARLEN)
    start_m = tl.program_id(1) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dy = _load_tile(dY + b * sdy_b + h * sdy_h + q_start * sdy_l, rows, L, sdy_l, sdy_d, dims, HEAD_DIM, BLOCK_D, True)
    y = _load_tile(Y + b * sy_b + h * sy_h + q_start * sy_l, rows, L, sy_l, sy_d, dims, HEAD_DIM, BLOCK_D, True)
    gate = _load_tile(G + b * sg_b + h * sg_h + q_start * sg_l, rows, L, sg_l, sg_d, dims, HEAD_DIM, BLOCK_D, True)
    dy_y = dy.to(ACC) * y.to(ACC)
    tl.store(Delta + b * sl_b + h * sl_h + q_start + rows, tl.sum(dy_y, axis=1), mask=rows < L)
    dgate = dy_y * (1.0 - tl.sigmoid(gate.to(ACC)))
    dg_base = dG + b * sdg_b + h * sdg_h + q_start * sdg_l
    if HEAD_WISE_GATE:
        tl.store(dg_base + rows * sdg_l, tl.sum(dgate, axis=1).to(dG.dtype.element_ty), mask=rows < L)
    else:
        _store_rows(dg_base, start_m, L, sdg_l, dgate.to(dG.dtype.element_ty), dims,
                    BLOCK_M, HEAD_DIM, BLOCK_D, False)


@triton.jit
def _bwd_inner(dk, dv, k, v, keys, head, q_src, dy_src, g_src, lse_base, delta_base, dq_base,
               sq_h, sq_l, sq_d, sdy_h, sdy_l, sdy_d, sg_h, sg_l, sg_d, sa_l, dims, lo, hi, L, S, qk_scale, scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr,
               ATOMIC_DQ: tl.constexpr, USE_TMA: tl.constexpr, HEAD_WISE_GATE: tl.constexpr,
               GATE_TMA: tl.constexpr):
    """Query head `head` of the group's sources: its query blocks [lo, hi) against the key block. dK and
    dV accumulate in registers; with ATOMIC_DQ, dQ += scale * dS K goes to the fp32 buffer by atomic
    adds. Every block is masked
    (ragged end, causal diagonal): one copy of the loop. Three copies specialised as the forward's
    (masked diagonal, unmasked middle, masked tail) kept registers alive across them and spilled at
    D128 in every tile of the search space (56-1072 B per thread, sm_90 report); one masked loop does
    not spill at 16 x 128 tiles, 8 warps, and a mask costs a few operations per P element.
    dQ is computed transposed, dQ^T = K^T dS^T [BLOCK_D, BLOCK_M]: the wide head dim is the matmul's M,
    so it runs on wgmma from shared memory; dS K with the 16-row query block as M fell back to mma.sync
    with K reloaded from shared memory into registers every block (sm_90 TTGIR)."""
    for start_m in tl.range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_head_rows(q_src, head, start_m, L, sq_h, sq_l, sq_d, dims, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
        dy = _load_head_rows(dy_src, head, start_m, L, sdy_h, sdy_l, sdy_d, dims, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
        s = _gate_sigmoid(g_src, head, start_m, L, sg_h, sg_l, sg_d, dims, ACC, BLOCK_M, HEAD_DIM, BLOCK_D,
                          HEAD_WISE_GATE, GATE_TMA)
        d_out = (dy.to(ACC) * s).to(q.dtype)  # dO = dY * s, fused into the load
        lse = tl.load(lse_base + rows, mask=rows < L, other=0.0)
        delta = tl.load(delta_base + rows, mask=rows < L, other=0.0)
        scores_t = _dot_over_d(k, q, DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(scores_t - lse[None, :] * LOG2E_)
        # Key rows past S load as zeros, so their scores are 0 and exp2(-lse) overflows to inf where every
        # real score is below about -88: masked too, or dQ gets 0 * inf = NaN.
        allowed = (rows < L)[None, :] & (keys < S)[:, None]
        if IS_CAUSAL:
            allowed = allowed & (keys[:, None] <= rows[None, :])
        p_t = tl.where(allowed, p_t, 0.0)
        dv += tl.dot(p_t.to(q.dtype), d_out, input_precision=DOT_PRECISION)
        dp_t = _dot_over_d(v, d_out, DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)  # softmax backward: dS = P * (dP - rowsum(dO * O))
        dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq_t = tl.dot(tl.trans(k), ds_t, input_precision=DOT_PRECISION) * scale  # [BLOCK_D, BLOCK_M]
            ptrs = dq_base + rows[None, :] * sa_l + dims[:, None]
            tl.atomic_add(ptrs, dq_t, mask=(rows < L)[None, :] & (dims < HEAD_DIM)[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_inner_split(dk, dv, k_c, keys, head, k_base, v_base, q_base, dy_base, g_base, lse_base, delta_base, dq_base,
                     sk_s, sk_d, sv_s, sv_d, sq_h, sq_l, sq_d, sdy_h, sdy_l, sdy_d, sg_h, sg_l, sg_d, sa_l, dims_c,
                     lo, hi, L, S, qk_scale, scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
                     ATOMIC_DQ: tl.constexpr, HEAD_WISE_GATE: tl.constexpr):
    """_bwd_inner for the head-dim chunk dims_c (SPLIT_D wide) of dK, dV and dQ: S^T and dP^T still sum
    over the whole head dim, chunk by chunk from memory (pointer loads; the tiles stay in L1/L2), so
    only [BLOCK_N, SPLIT_D] of K, dK and dV stay resident. The exact dtypes' path: a float64 or FMA
    float32 [BLOCK_N, D] tile per resident tensor spilled at D >= 64 in every tile (sm_90 report)."""
    q_head = q_base + tl.cast(head, tl.int64) * sq_h
    dy_head = dy_base + tl.cast(head, tl.int64) * sdy_h
    for start_m in tl.range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        scores_t = tl.zeros([BLOCK_N, BLOCK_M], ACC)
        dp_t = tl.zeros([BLOCK_N, BLOCK_M], ACC)
        for j in tl.range(0, HEAD_DIM, SPLIT_D, num_stages=1):  # S^T = K Q^T, dP^T = V dO^T over the whole head dim
            dims = j + tl.arange(0, SPLIT_D)
            k_j = _load_tile(k_base, keys, S, sk_s, sk_d, dims, HEAD_DIM, BLOCK_D, True)
            q_j = _load_tile(q_head, rows, L, sq_l, sq_d, dims, HEAD_DIM, BLOCK_D, True)
            scores_t += tl.dot(k_j, tl.trans(q_j), input_precision=DOT_PRECISION)
            v_j = _load_tile(v_base, keys, S, sv_s, sv_d, dims, HEAD_DIM, BLOCK_D, True)
            dy_j = _load_tile(dy_head, rows, L, sdy_l, sdy_d, dims, HEAD_DIM, BLOCK_D, True)
            s_j = _gate_sigmoid(g_base, head, start_m, L, sg_h, sg_l, sg_d, dims, ACC, BLOCK_M, HEAD_DIM, BLOCK_D,
                                HEAD_WISE_GATE, False)
            dp_t += tl.dot(v_j, tl.trans((dy_j.to(ACC) * s_j).to(v_j.dtype)), input_precision=DOT_PRECISION)
        lse = tl.load(lse_base + rows, mask=rows < L, other=0.0)
        delta = tl.load(delta_base + rows, mask=rows < L, other=0.0)
        p_t = tl.math.exp2(scores_t * qk_scale - lse[None, :] * LOG2E_)
        # Key rows past S load as zeros, so their scores are 0 and exp2(-lse) overflows to inf where every
        # real score is below about -88: masked too, or dQ gets 0 * inf = NaN.
        allowed = (rows < L)[None, :] & (keys < S)[:, None]
        if IS_CAUSAL:
            allowed = allowed & (keys[:, None] <= rows[None, :])
        p_t = tl.where(allowed, p_t, 0.0)
        q_c = _load_tile(q_head, rows, L, sq_l, sq_d, dims_c, HEAD_DIM, BLOCK_D, True)
        dy_c = _load_tile(dy_head, rows, L, sdy_l, sdy_d, dims_c, HEAD_DIM, BLOCK_D, True)
        s_c = _gate_sigmoid(g_base, head, start_m, L, sg_h, sg_l, sg_d, dims_c, ACC, BLOCK_M, HEAD_DIM, BLOCK_D,
                            HEAD_WISE_GATE, False)
        d_out_c = (dy_c.to(ACC) * s_c).to(q_c.dtype)
        dv += tl.dot(p_t.to(q_c.dtype), d_out_c, input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_c.dtype)
        dk += tl.dot(ds_t, q_c, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq_t = tl.dot(tl.trans(k_c), ds_t, input_precision=DOT_PRECISION) * scale  # [SPLIT_D, BLOCK_M]
            ptrs = dq_base + rows[None, :] * sa_l + dims_c[:, None]
            tl.atomic_add(ptrs, dq_t, mask=(rows < L)[None, :] & (dims_c < HEAD_DIM)[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def gated_attention_bwd_kernel(
    Q, K, V, G, dY, Lse, Delta, dQacc, dK, dV, CuQ, CuK,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sv_b, sv_h, sv_s, sv_d,
    sg_b, sg_h, sg_l, sg_d,
    sdy_b, sdy_h, sdy_l, sdy_d,
    sl_b, sl_h,
    sa_b, sa_h, sa_l,
    sdk_b, sdk_h, sdk_s,
    H, H_KV, L, S, GROUP, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
    ATOMIC_DQ: tl.constexpr = True, VARLEN: tl.constexpr = False, USE_TMA: tl.constexpr = False,
    HEAD_WISE_GATE: tl.constexpr = False, GATE_TMA: tl.constexpr = False, SPLIT_D: tl.constexpr = 0,
    QK_SCALE_F64: tl.constexpr = None, SCALE_F64: tl.constexpr = None,
):
    """Grid (sequences * Hkv, key blocks, head-dim chunks). dV = sum P^T dO and dK = scale * sum dS^T Q
    over the group's query heads; dQacc (fp32, unit dim stride) += scale * dS K when ATOMIC_DQ. SPLIT_D > 0:
    each program makes the SPLIT_D columns of chunk program_id(2) (_bwd_inner_split, pointer loads)."""
    qk_scale = exact_scalar(qk_scale, QK_SCALE_F64, ACC)  # float64: exact (float arguments are float32 on a GPU)
    scale = exact_scalar(scale, SCALE_F64, ACC)
    pid_bkv = tl.program_id(0).to(tl.int64)  # 64-bit base offsets: tensors may pass 2^31 elements
    start_n = tl.program_id(1) * BLOCK_N  # ascending: causal key blocks longest first
    b = pid_bkv // H_KV
    kv_h = pid_bkv % H_KV
    q_start, L = _sequence(CuQ, b, L, VARLEN)
    k_start, S = _sequence(CuK, b, S, VARLEN)
    if start_n >= S:  # varlen: a sequence shorter than the longest
        return
    keys = start_n + tl.arange(0, BLOCK_N)
    lo = 0
    if IS_CAUSAL:  # queries before the key block's first key see none of it (top-left causal)
        lo = (start_n // BLOCK_M) * BLOCK_M
    h0 = kv_h * GROUP  # the group's query heads h0 .. h0 + GROUP - 1: one descriptor each for Q, dY, gate
    if SPLIT_D:
        dims_c = tl.program_id(2) * SPLIT_D + tl.arange(0, SPLIT_D)
        k_base = K + b * sk_b + kv_h * sk_h + k_start * sk_s
        v_base = V + b * sv_b + kv_h * sv_h + k_start * sv_s
        k_c = _load_tile(k_base, keys, S, sk_s, sk_d, dims_c, HEAD_DIM, BLOCK_D, True)
        dk = tl.zeros([BLOCK_N, SPLIT_D], ACC)
        dv = tl.zeros([BLOCK_N, SPLIT_D], ACC)
        for g in range(GROUP):
            h = h0 + g
            dk, dv = _bwd_inner_split(
                dk, dv, k_c, keys, g, k_base, v_base, Q + b * sq_b + h0 * sq_h + q_start * sq_l,
                dY + b * sdy_b + h0 * sdy_h + q_start * sdy_l, G + b * sg_b + h0 * sg_h + q_start * sg_l,
                Lse + b * sl_b + h * sl_h + q_start, Delta + b * sl_b + h * sl_h + q_start,
                dQacc + b * sa_b + h * sa_h + q_start * sa_l,
                sk_s, sk_d, sv_s, sv_d, sq_h, sq_l, sq_d, sdy_h, sdy_l, sdy_d, sg_h, sg_l, sg_d, sa_l, dims_c,
                lo, L, L, S, qk_scale, scale, HEAD_DIM, BLOCK_D, SPLIT_D, IS_CAUSAL, DOT_PRECISION, BLOCK_M, BLOCK_N,
                ACC, ATOMIC_DQ, HEAD_WISE_GATE)
        base = b * sdk_b + kv_h * sdk_h + k_start * sdk_s
        _store_rows(dK + base, start_n, S, sdk_s, (dk * scale).to(dK.dtype.element_ty), dims_c, BLOCK_N, HEAD_DIM,
                    BLOCK_D, False)
        _store_rows(dV + base, start_n, S, sdk_s, dv.to(dV.dtype.element_ty), dims_c, BLOCK_N, HEAD_DIM, BLOCK_D,
                    False)
        return
    dims = tl.arange(0, BLOCK_D)
    k_src = _rows_source(K + b * sk_b + kv_h * sk_h + k_start * sk_s, S, sk_s, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    v_src = _rows_source(V + b * sv_b + kv_h * sv_h + k_start * sv_s, S, sv_s, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    k = _load_rows(k_src, start_n, S, sk_s, sk_d, dims, BLOCK_N, HEAD_DIM, BLOCK_D, True, USE_TMA)
    v = _load_rows(v_src, start_n, S, sv_s, sv_d, dims, BLOCK_N, HEAD_DIM, BLOCK_D, True, USE_TMA)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    q_src = _heads_source(Q + b * sq_b + h0 * sq_h + q_start * sq_l, GROUP, L, sq_h, sq_l, BLOCK_M, HEAD_DIM,
                          BLOCK_D, USE_TMA)
    dy_src = _heads_source(dY + b * sdy_b + h0 * sdy_h + q_start * sdy_l, GROUP, L, sdy_h, sdy_l, BLOCK_M, HEAD_DIM,
                           BLOCK_D, USE_TMA)
    g_src = _heads_source(G + b * sg_b + h0 * sg_h + q_start * sg_l, GROUP, L, sg_h, sg_l, BLOCK_M, HEAD_DIM,
                          BLOCK_D, GATE_TMA)
    for g in range(GROUP):
        h = h0 + g
        lse_base = Lse + b * sl_b + h * sl_h + q_start
        delta_base = Delta + b * sl_b + h * sl_h + q_start
        dq_base = dQacc + b * sa_b + h * sa_h + q_start * sa_l
        dk, dv = _bwd_inner(dk, dv, k, v, keys, g, q_src, dy_src, g_src, lse_base, delta_base, dq_base,
                            sq_h, sq_l, sq_d, sdy_h, sdy_l, sdy_d, sg_h, sg_l, sg_d, sa_l, dims, lo, L, L, S,
                            qk_scale, scale,
                            HEAD_DIM, BLOCK_D, IS_CAUSAL, DOT_PRECISION, BLOCK_M, ACC, ATOMIC_DQ, USE_TMA,
                            HEAD_WISE_GATE, GATE_TMA)
    dk_src = _rows_source(dK + b * sdk_b + kv_h * sdk_h + k_start * sdk_s, S, sdk_s, BLOCK_N, HEAD_DIM, BLOCK_D,
                          USE_TMA)
    dv_src = _rows_source(dV + b * sdk_b + kv_h * sdk_h + k_start * sdk_s, S, sdk_s, BLOCK_N, HEAD_DIM, BLOCK_D,
                          USE_TMA)
    _store_rows(dk_src, start_n, S, sdk_s, (dk * scale).to(dK.dtype.element_ty), dims, BLOCK_N, HEAD_DIM, BLOCK_D,
                USE_TMA)
    _store_rows(dv_src, start_n, S, sdk_s, dv.to(dV.dtype.element_ty), dims, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)


@triton.jit
def _dq_inner(dq, q, d_out, lse, delta, k_src, v_src, sk_s, sk_d, sv_s, sv_d, rows, dims, lo, hi, S, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Accumulate key blocks [lo, hi) into the query block's dQ (unscaled)."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        k, v, scores = _key_block(q, k_src, v_src, sk_s, sk_d, sv_s, sv_d, rows, dims, start_n, S, qk_scale,
                                  HEAD_DIM, BLOCK_D, IS_CAUSAL, DOT_PRECISION, BLOCK_N, MASKED, USE_TMA)
        p = tl.math.exp2(scores - lse[:, None])  # masked scores are -inf: p = 0 there
        dp = _dot_over_d(d_out, v, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def gated_attention_bwd_dq_kernel(
    Q, K, V, G, dY, Lse, Delta, dQ, CuQ, CuK,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sv_b, sv_h, sv_s, sv_d,
    sg_b, sg_h, sg_l, sg_d,
    sdy_b, sdy_h, sdy_l, sdy_d,
    sl_b, sl_h,
    sdq_b, sdq_h, sdq_l,
    H, L, S, GROUP, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
    VARLEN: tl.constexpr = False, USE_TMA: tl.constexpr = False, HEAD_WISE_GATE: tl.constexpr = False,
    GATE_TMA: tl.constexpr = False, QK_SCALE_F64: tl.constexpr = None, SCALE_F64: tl.constexpr = None,
):
    """Deterministic mode: dQ = scale * sum dS K per query block, dS = P * (dO V^T - delta), the key
    blocks summed in a fixed order. Grid (sequences * Hq, query blocks), longest first when causal."""
    qk_scale = exact_scalar(qk_scale, QK_SCALE_F64, ACC)  # float64: exact (float arguments are float32 on a GPU)
    scale = exact_scalar(scale, SCALE_F64, ACC)
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit base offsets: tensors may pass 2^31 elements
    if IS_CAUSAL:
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kv_h = h // GROUP
    q_start, L = _sequence(CuQ, b, L, VARLEN)
    k_start, S = _sequence(CuK, b, S, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= L:
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_src = _rows_source(Q + b * sq_b + h * sq_h + q_start * sq_l, L, sq_l, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
    dy_src = _rows_source(dY + b * sdy_b + h * sdy_h + q_start * sdy_l, L, sdy_l, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
    q = _load_rows(q_src, start_m, L, sq_l, sq_d, dims, BLOCK_M, HEAD_DIM, BLOCK_D, True, USE_TMA)
    dy = _load_rows(dy_src, start_m, L, sdy_l, sdy_d, dims, BLOCK_M, HEAD_DIM, BLOCK_D, True, USE_TMA)
    g_src = _heads_source(G + b * sg_b + q_start * sg_l, H, L, sg_h, sg_l, BLOCK_M, HEAD_DIM, BLOCK_D, GATE_TMA)
    s = _gate_sigmoid(g_src, h, start_m, L, sg_h, sg_l, sg_d, dims, ACC, BLOCK_M, HEAD_DIM, BLOCK_D, HEAD_WISE_GATE,
                      GATE_TMA)
    d_out = (dy.to(ACC) * s).to(q.dtype)  # dO = dY * s
    lse = tl.load(Lse + b * sl_b + h * sl_h + q_start + rows, mask=rows < L, other=0.0) * LOG2E_
    delta = tl.load(Delta + b * sl_b + h * sl_h + q_start + rows, mask=rows < L, other=0.0)
    k_src = _rows_source(K + b * sk_b + kv_h * sk_h + k_start * sk_s, S, sk_s, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    v_src = _rows_source(V + b * sv_b + kv_h * sv_h + k_start * sv_s, S, sv_s, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    full_hi, hi = _key_ranges(start_m, S, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _dq_inner(dq, q, d_out, lse, delta, k_src, v_src, sk_s, sk_d, sv_s, sv_d, rows, dims, 0, full_hi, S,
                   qk_scale, HEAD_DIM, BLOCK_D, IS_CAUSAL, DOT_PRECISION, BLOCK_N, False, USE_TMA)
    dq = _dq_inner(dq, q, d_out, lse, delta, k_src, v_src, sk_s, sk_d, sv_s, sv_d, rows, dims, full_hi, hi, S,
                   qk_scale, HEAD_DIM, BLOCK_D, IS_CAUSAL, DOT_PRECISION, BLOCK_N, True, USE_TMA)
    dq_src = _rows_source(dQ + b * sdq_b + h * sdq_h + q_start * sdq_l, L, sdq_l, BLOCK_M, HEAD_DIM, BLOCK_D, USE_TMA)
    _store_rows(dq_src, start_m, L, sdq_l, (dq * scale).to(dQ.dtype.element_ty), dims, BLOCK_M, HEAD_DIM, BLOCK_D,
                USE_TMA)


MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis, which carries the row blocks
MAX_LEN = MAX_GRID_Y * 16  # rows the smallest (16-row) blocks cover within that limit
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _rows_strides(t, packed):
    """(batch, head, row, dim) strides: of a [B, H, N, D] tensor, or of a packed [T, H, D] one (batch 0)."""
    return (0, t.stride(1), t.stride(0), t.stride(2)) if packed else tuple(t.stride())


def _stats_strides(t, packed):
    """(batch, head) strides of an lse-like tensor with unit row stride: [B, H, L], or [H, T] packed."""
    return (0, t.stride(0)) if packed else (t.stride(0), t.stride(1))


def _descriptors_allowed(*tensors):
    """Whether every tensor meets the tensor-descriptor (TMA) rules: unit last stride, 16-byte aligned
    base and other strides. On CUDA only from Hopper (sm_90) on; the interpreter checks the same rules."""
    device = tensors[0].device
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device)[0] < 9:
            return False
    elif not _interpreted():
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return False
        if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):  # an expanded (broadcast) dim
            return False
    return True


def _interpreted():
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _set_descriptor_allocator(device):
    """In-kernel tensor descriptors need a small global scratch per program on the GPU; Triton asks
    the allocator set by triton.set_allocator (a context variable: set in the launching thread)."""
    if device.type != "cuda":
        return
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _problem(q, k, v, gate, is_causal, scale, varlen):
    """Sizes, strides and constexprs of one call. varlen: None (dense [B, H, N, D]) or
    (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) for packed [T, H, D] tensors."""
    packed = varlen is not None
    if packed:
        cu_q, cu_k, q_len, kv_len = varlen
        batch = cu_q.shape[0] - 1
        heads, head_dim = q.shape[1], q.shape[2]
        kv_heads = k.shape[1]
    else:
        batch, heads, q_len, head_dim = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        cu_q = cu_k = q  # never read
    if max(q_len, kv_len) > MAX_LEN:
        raise ValueError(f"q: sequence length {max(q_len, kv_len)} exceeds the Triton kernel's {MAX_LEN}")
    if head_dim > 256:
        raise ValueError(f"q: head dim {head_dim} exceeds the Triton kernel's 256")
    block_d = max(triton.next_power_of_2(head_dim), 16)
    exact = q.dtype == torch.float64  # float64 (gradcheck on the GPU): float64 accumulation, FMA matmuls
    return dict(
        packed=packed, cu_q=cu_q, cu_k=cu_k,
        batch=batch, heads=heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
        scale=head_dim**-0.5 if scale is None else scale,
        gate=gate.expand(q.shape),  # head-wise gate: stride 0 along D
        head_wise=gate.shape[-1] == 1 and head_dim != 1,
        stats_dtype=torch.float64 if exact else torch.float32,  # lse, delta and the dQ accumulator
        match=dict(dtype=DTYPE_NAMES[q.dtype], D=block_d, causal=bool(is_causal)),
        sizes=dict(L=q_len, S=kv_len),
        meta=dict(
            HEAD_DIM=head_dim, BLOCK_D=block_d, IS_CAUSAL=bool(is_causal),
            DOT_PRECISION="tf32" if q.dtype in (torch.float16, torch.bfloat16) else "ieee",
            ACC=tl.float64 if exact else tl.float32, VARLEN=packed,
        ),
    )


def _gate_modes(a, use_tma):
    """How the kernels read the gate: a head-wise gate as one value per row; a full one through a tensor
    descriptor when it meets the rules too (a dtype-converted or strided gate by pointers)."""
    head_wise = a["head_wise"]
    return dict(HEAD_WISE_GATE=head_wise, GATE_TMA=use_tma and not head_wise and _descriptors_allowed(a["gate"]))


def _all_descriptors(use_tma, gate_modes):
    """Whether every tile goes through a tensor descriptor (the heuristics' `tma` key)."""
    return bool(use_tma and (gate_modes["HEAD_WISE_GATE"] or gate_modes["GATE_TMA"]))


def _forward(q, k, v, gate, is_causal, scale, varlen, has_gate=True):
    a = _problem(q, k, v, gate, is_causal, scale, varlen)
    packed = a["packed"]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    stats_shape = (q.shape[1], q.shape[0]) if packed else q.shape[:3]
    lse = torch.empty(stats_shape, dtype=a["stats_dtype"], device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    g = a["gate"]
    use_tma = _descriptors_allowed(q, k, v, out)
    gate_modes = _gate_modes(a, use_tma)
    match = dict(a["match"], tma=_all_descriptors(use_tma, gate_modes))
    _set_descriptor_allocator(q.device)
    qk_scale = a["scale"] * LOG2E
    exact_scales = float64_scalars(q.dtype, qk_scale=qk_scale)

    def run(config):
        constexprs, options = split_options(config)
        return gated_attention_fwd_kernel[(a["batch"] * a["heads"], triton.cdiv(a["q_len"], config["BLOCK_M"]))](
            q, k, v, g, out, lse, a["cu_q"], a["cu_k"],
            *_rows_strides(q, packed), *_rows_strides(k, packed), *_rows_strides(v, packed), *_rows_strides(g, packed),
            *_rows_strides(out, packed)[:3], *_stats_strides(lse, packed),
            a["heads"], a["q_len"], a["kv_len"], a["heads"] // a["kv_heads"], qk_scale, **exact_scales,
            **a["meta"], **constexprs, **options, HAS_GATE=has_gate, USE_TMA=use_tma, **gate_modes,
        )

    FWD.launch(run, q.device, match, a["sizes"])
    return out, lse


def _backward(grad_out, q, k, v, gate, out, lse, is_causal, scale, varlen, deterministic):
    a = _problem(q, k, v, gate, is_causal, scale, varlen)
    packed, batch, heads, kv_heads = a["packed"], a["batch"], a["heads"], a["kv_heads"]
    head_wise = a["head_wise"]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if q.numel() == 0:  # no query: nothing flows back to the keys
        return dq, dk.zero_(), dv.zero_(), dgate
    lse = lse.to(a["stats_dtype"]).contiguous()
    g = a["gate"]
    delta = torch.empty_like(lse)
    meta = a["meta"]
    strides = dict(q=_rows_strides(q, packed), k=_rows_strides(k, packed), v=_rows_strides(v, packed),
                   g=_rows_strides(g, packed), dy=_rows_strides(grad_out, packed), lse=_stats_strides(lse, packed))

    def run_preprocess(config):
        constexprs, options = split_options(config)
        return gated_attention_bwd_preprocess_kernel[(batch * heads, triton.cdiv(a["q_len"], config["BLOCK_M"]))](
            grad_out, out, g, delta, dgate, a["cu_q"],
            *strides["dy"], *_rows_strides(out, packed), *strides["g"], *_rows_strides(dgate, packed)[:3],
            *strides["lse"], heads, a["q_len"],
            HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"], HEAD_WISE_GATE=head_wise, ACC=meta["ACC"],
            VARLEN=packed, **constexprs, **options,
        )

    PREPROCESS.launch(run_preprocess, q.device, dict(dtype=a["match"]["dtype"], D=meta["BLOCK_D"]))
    if k.numel() == 0:  # no key: the output is 0 whatever q, k, v are
        return dq.zero_(), dk, dv, dgate
    # Atomic mode adds dQ into an fp32 (float64) buffer: q's own gradient when q has that dtype.
    dq_acc = dq if deterministic or q.dtype == a["stats_dtype"] else torch.empty(
        q.shape, dtype=a["stats_dtype"], device=q.device)
    use_tma = _descriptors_allowed(q, k, v, grad_out, dq, dk, dv)
    gate_modes = _gate_modes(a, use_tma)
    match = dict(a["match"], tma=_all_descriptors(use_tma, gate_modes))
    _set_descriptor_allocator(q.device)
    common = (*strides["q"], *strides["k"], *strides["v"], *strides["g"], *strides["dy"], *strides["lse"])
    qk_scale = a["scale"] * LOG2E
    exact_scales = float64_scalars(q.dtype, qk_scale=qk_scale, scale=a["scale"])

    def run_bwd(config):
        constexprs, options = split_options(config)
        if not deterministic:  # zeroed per launch: the tuner may launch it many times
            dq_acc.zero_()
        split = config.get("SPLIT_D", 0)  # head-dim chunks, one program each
        grid = (batch * kv_heads, triton.cdiv(a["kv_len"], config["BLOCK_N"]), triton.cdiv(meta["HEAD_DIM"], split) if split else 1)
        return gated_attention_bwd_kernel[grid](
            q, k, v, g, grad_out, lse, delta, dq_acc, dk, dv, a["cu_q"], a["cu_k"], *common,
            *_rows_strides(dq_acc, packed)[:3], *_rows_strides(dk, packed)[:3],
            heads, kv_heads, a["q_len"], a["kv_len"], heads // kv_heads, qk_scale, a["scale"], **exact_scales,
            **meta, **constexprs, **options, ATOMIC_DQ=not deterministic, USE_TMA=use_tma, **gate_modes,
        )

    def run_dq(config):
        constexprs, options = split_options(config)
        return gated_attention_bwd_dq_kernel[(batch * heads, triton.cdiv(a["q_len"], config["BLOCK_M"]))](
            q, k, v, g, grad_out, lse, delta, dq, a["cu_q"], a["cu_k"], *common, *_rows_strides(dq, packed)[:3],
            heads, a["q_len"], a["kv_len"], heads // kv_heads, qk_scale, a["scale"], **exact_scales,
            **meta, **constexprs, **options, USE_TMA=use_tma, **gate_modes,
        )

    BWD.launch(run_bwd, q.device, match, a["sizes"])
    if deterministic:
        DQ.launch(run_dq, q.device, match, a["sizes"])
    elif dq_acc is not dq:
        dq.copy_(dq_acc)  # the cast pass (the scale is applied before the atomic adds)
    return dq, dk, dv, dgate


def gated_attention_forward(q, k, v, gate, is_causal=False, scale=None):
    """(out [B, Hq, L, D] in q's dtype, lse [B, Hq, L] float32, float64 for float64 q). gate=None runs
    the same kernel ungated (plain SDPA): the benchmark's measure of what the fused gate costs."""
    if gate is None:
        return _forward(q, k, v, q[..., :1], is_causal, scale, None, has_gate=False)  # the gate is never read
    return _forward(q, k, v, gate, is_causal, scale, None)


def gated_attention_backward(grad_out, q, k, v, gate, out, lse, is_causal=False, scale=None, deterministic=False):
    """(dq, dk, dv, dgate) in the dtypes and shapes of (q, k, v, gate). deterministic: dQ by the
    separate fixed-order kernel instead of fp32 atomic adds."""
    return _backward(grad_out, q, k, v, gate, out, lse, is_causal, scale, None, deterministic)


def gated_attention_varlen_forward(q, k, v, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   is_causal=False, scale=None):
    """Packed q, gate [Tq, Hq, D or 1], k, v [Tk, Hkv, D] -> (out [Tq, Hq, D], lse [Hq, Tq])."""
    varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _forward(q, k, v, gate, is_causal, scale, varlen)


def gated_attention_varlen_backward(grad_out, q, k, v, gate, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, is_causal=False, scale=None, deterministic=False):
    varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _backward(grad_out, q, k, v, gate, out, lse, is_causal, scale, varlen, deterministic)


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

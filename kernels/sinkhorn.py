"""Triton sinkhorn: a program holds BLOCK_B matrices as one [BLOCK_B, NP, NP] tile in registers
(NP = n rounded up to a power of two, padding masked to zero), so each of the 2*iters
normalisations is a register reduction and HBM sees one read of the logits and one write of P.

Backward (mHC eq. 9 unrolled): one normalisation y = x / S, S = sum x + eps along an axis, has
dx = (dy - <dy, y>) / S. After k steps the matrix is diag(a) E diag(b) with E = exp(L - max), so a
step is fixed by its n sums S: the forward keeps the 2*iters sum vectors in registers (iters a
compile-time constant, the loops unrolled, up to MAX_UNROLLED_ITERS) and the backward walks back
with x = y S: O(iters) arithmetic, nothing per-iteration in memory. Above the cap each step's input
is recomputed from the logits instead (O(iters^2), still on chip).
"""
import torch
import triton
import triton.language as tl

from .float64_scalars import exact_scalar, float64_scalars
from .tuning import KernelConfigs, split_options


@triton.jit
def _normalise_columns(p, eps):
    return p / (tl.expand_dims(tl.sum(p, axis=1), 1) + eps)


@triton.jit
def _normalise_rows(p, eps):
    return p / (tl.expand_dims(tl.sum(p, axis=2), 2) + eps)


@triton.jit
def _load_tile(ptr, pid, matrices, n, BLOCK_B: tl.constexpr, NP: tl.constexpr, other):
    """Offsets (int64: matrices * n * n passes 2^31 at 2^23 matrices of 16 x 16), mask and values of
    BLOCK_B contiguous n x n matrices."""
    b = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None, None]
    i = tl.arange(0, NP)[None, :, None]
    j = tl.arange(0, NP)[None, None, :]
    offsets = b * n * n + i * n + j
    mask = (b < matrices) & (i < n) & (j < n)
    return offsets, mask, tl.load(ptr + offsets, mask=mask, other=other)


@triton.jit
def _shifted_exp(logits):
    """exp(logits - max) per matrix, with the max (0 for an all-padding matrix)."""
    max_logit = tl.max(tl.max(logits, axis=2), axis=1)
    max_logit = tl.where(max_logit == float("-inf"), 0.0, max_logit)[:, None, None]
    return tl.exp(logits - max_logit), max_logit


@triton.jit
def sinkhorn_fwd_kernel(logits_ptr, out_ptr, matrices, n, iters, eps,
                        ACC: tl.constexpr, BLOCK_B: tl.constexpr, NP: tl.constexpr, EPS_F64: tl.constexpr = None):
    eps = exact_scalar(eps, EPS_F64, ACC)  # float64: exact (a float argument is float32 on a GPU)
    offsets, mask, logits = _load_tile(logits_ptr, tl.program_id(0), matrices, n, BLOCK_B, NP, float("-inf"))
    p = sinkhorn_tile(logits.to(ACC), iters, eps)
    tl.store(out_ptr + offsets, p.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sinkhorn_tile(logits, iters, eps):
    """P of a [B, NP, NP] tile of logits (padding -inf, so it stays 0). Shared with kernels/mhc.py."""
    p, _ = _shifted_exp(logits)
    for _ in tl.range(0, iters):
        p = _normalise_rows(_normalise_columns(p, eps), eps)
    return p


@triton.jit
def sinkhorn_bwd_kernel(logits_ptr, grad_ptr, grad_logits_ptr, matrices, n, iters, eps,
                        ACC: tl.constexpr, BLOCK_B: tl.constexpr, NP: tl.constexpr, UNROLLED_ITERS: tl.constexpr,
                        EPS_F64: tl.constexpr = None):
    eps = exact_scalar(eps, EPS_F64, ACC)  # float64: exact (a float argument is float32 on a GPU)
    pid = tl.program_id(0)
    offsets, mask, logits = _load_tile(logits_ptr, pid, matrices, n, BLOCK_B, NP, float("-inf"))
    g = _load_tile(grad_ptr, pid, matrices, n, BLOCK_B, NP, 0.0)[2]
    g = sinkhorn_backward_tile(logits.to(ACC), g.to(ACC), mask, iters, eps, UNROLLED_ITERS)
    tl.store(grad_logits_ptr + offsets, g.to(grad_logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sinkhorn_backward_tile(logits, g, mask, iters, eps, UNROLLED_ITERS: tl.constexpr):
    """dL/dlogits of a [B, NP, NP] tile from dL/dP = g (mask: the real entries). Shared with kernels/mhc.py.

    UNROLLED_ITERS = iters (at most MAX_UNROLLED_ITERS): O(iters) with the loops unrolled; -1: any
    iters, O(iters^2) (each step's input recomputed from the logits)."""
    e, max_logit = _shifted_exp(logits)
    if UNROLLED_ITERS >= 0:
        g = _backward_unrolled(e, g, mask, eps, UNROLLED_ITERS)
    else:
        g = _backward_recomputed(e, g, mask, iters, eps)
    # Through exp(L - max L): the max's share of the gradient is split over ties, as torch's amax.
    g = g * e
    is_max = (logits == max_logit) & mask
    maxima = tl.maximum(tl.sum(tl.sum(is_max.to(g.dtype), axis=2), axis=1), 1.0)[:, None, None]
    total = tl.sum(tl.sum(g, axis=2), axis=1)[:, None, None]
    return tl.where(is_max, g - total / maxima, g)


@triton.jit
def _backward_unrolled(e, g, mask, eps, ITERS: tl.constexpr):
    """Back through the 2*ITERS normalisations of P from E = exp(L - max). The forward keeps each step's
    sums S (n values per matrix: a [B, 1, NP] or [B, NP, 1] tile) in registers; going back, each step's
    input is its output times S (x = y S), so every step costs O(n^2) once: O(iters) in all, nothing
    recomputed, nothing in memory."""
    x = e
    sums = ()
    for step in tl.static_range(2 * ITERS):  # even steps normalise columns (axis 1), odd steps rows (axis 2)
        line_sums = _line_sums(x, 1 + step % 2) + eps
        sums = sums + (line_sums,)
        x = x * _reciprocal(line_sums)
    # (Step numbers stay inline expressions: a constexpr assigned to a name becomes a tensor, which
    # cannot index the tuple.)
    for reverse_step in tl.static_range(2 * ITERS):
        line_sums = sums[2 * ITERS - 1 - reverse_step]
        # y = x / S along the axis: dx = (dy - <dy, y>) / S, with y the step's output (x here)
        dot = _line_sums(g * x, 1 + (2 * ITERS - 1 - reverse_step) % 2)
        g = tl.where(mask, (g - dot) * _reciprocal(line_sums), 0.0)  # padding lanes carry no gradient
        x = x * line_sums  # the step's input
    return g


@triton.jit
def _reciprocal(s):
    """1 / s for the n sums of a step, divided once each. In float32 without IEEE rounding (within 2 ulp):
    the IEEE division's slow path is a subroutine call, whose saved registers spill the 2*iters kept sums."""
    return tl.fdiv(tl.full(s.shape, 1.0, s.dtype), s, ieee_rounding=False)


@triton.jit
def _line_sums(x, AXIS: tl.constexpr):
    """Sums of a [B, NP, NP] tile along AXIS (1: columns, 2: rows), kept as a broadcastable axis."""
    return tl.expand_dims(tl.sum(x, axis=AXIS), AXIS)


@triton.jit
def _backward_recomputed(e, g, mask, iters, eps):
    """The same for any iters: each step's input recomputed from E, O(iters^2) arithmetic on chip."""
    for reverse_step in tl.range(0, 2 * iters):
        step = 2 * iters - 1 - reverse_step
        x = e
        for _round in tl.range(0, step // 2):
            x = _normalise_rows(_normalise_columns(x, eps), eps)
        # (Each branch names its own sums: a runtime if may only merge values of one shape.)
        if step % 2 == 1:  # a row normalisation, whose input had one more column normalisation
            x = _normalise_columns(x, eps)
            row_sums = tl.expand_dims(tl.sum(x, axis=2), 2) + eps
            g = (g - tl.expand_dims(tl.sum(g * x / row_sums, axis=2), 2)) / row_sums
        else:
            col_sums = tl.expand_dims(tl.sum(x, axis=1), 1) + eps
            g = (g - tl.expand_dims(tl.sum(g * x / col_sums, axis=1), 1)) / col_sums
        g = tl.where(mask, g, 0.0)  # padding lanes carry no gradient (else the next step divides them by eps)
    return g


MAX_UNROLLED_ITERS = 32  # above it the backward recomputes (the unrolled one keeps 2*iters sums in registers)


def unrolled_iters(iters, dtype):
    """The UNROLLED_ITERS constexpr of sinkhorn_backward_tile for `iters` rounds of `dtype` (torch) math.
    float64 (the exact path for gradcheck) recomputes: its division is a subroutine call, which spills
    the kept sums."""
    return iters if iters <= MAX_UNROLLED_ITERS and dtype != torch.float64 else -1


def _sinkhorn_configs(name, values_per_program):
    """Heuristic: about `values_per_program` matrix entries per program of 4 warps (BLOCK_B matrices of
    NP x NP, NP the key's padded n); the search space runs from a quarter to twice that."""

    def heuristic(match):
        return dict(BLOCK_B=max(1, values_per_program // (match["n"] * match["n"])), num_warps=4)

    def space(match):
        base = heuristic(match)["BLOCK_B"]
        return [dict(BLOCK_B=max(1, base * f // 4), num_warps=w) for f in (1, 2, 4, 8) for w in (1, 2, 4, 8)]

    return KernelConfigs(name, space=space, heuristic=heuristic, smallest=heuristic)


FWD = _sinkhorn_configs("sinkhorn_fwd", 2048)
# The backward keeps 2*iters sum vectors per matrix in registers: 2 entries per thread leave room for
# MAX_UNROLLED_ITERS without spilling (sm_90 compile report).
BWD = _sinkhorn_configs("sinkhorn_bwd", 256)


def _padded(n):
    return max(triton.next_power_of_2(n), 2)


def _acc_dtype(t):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _launch(configs, kernel, logits, *inputs, iters, eps, **constexprs):
    """Run `kernel` over every n x n matrix of logits; returns its output (contiguous, logits' dtype)."""
    n = logits.shape[-1]
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    matrices = out.numel() // (n * n) if n else 0
    if matrices == 0:
        return out
    padded = _padded(n)
    args = (logits.contiguous(), *(t.contiguous() for t in inputs), out, matrices, n, iters, eps)

    def run(config):
        blocks, options = split_options(config)
        kernel[(triton.cdiv(matrices, config["BLOCK_B"]),)](*args, ACC=_acc_dtype(logits), NP=padded,
                                                           **float64_scalars(logits.dtype, eps=eps),
                                                           **blocks, **constexprs, **options)

    configs.launch(run, logits.device, dict(dtype="fp64" if logits.dtype == torch.float64 else "fp32", n=padded))
    return out


def sinkhorn_forward(logits, iters=20, eps=1e-6):
    return _launch(FWD, sinkhorn_fwd_kernel, logits, iters=iters, eps=eps)


def sinkhorn_backward(grad, logits, iters=20, eps=1e-6):
    return _launch(BWD, sinkhorn_bwd_kernel, logits, grad, iters=iters, eps=eps,
                   UNROLLED_ITERS=unrolled_iters(iters, logits.dtype))

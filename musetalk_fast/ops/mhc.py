"""mhc_pre, mhc_post: DeepSeek mHC's stream mixing around a layer (docs/ops.md §5, arXiv 2512.24880).

mhc_pre is composite over `mhc_pre_forward` -> (x_in, h_post, h_res, y, r), which carries the
autograd (y and r are what its backward reads), and `mhc_pre_backward`; mhc_post carries its own
autograd through `mhc_post_backward`. CPU: csrc/mhc/cpu.cpp. CUDA: the Triton kernels of
kernels/mhc.py. Gradients for every floating input.
"""
import torch

from ..reference import compute_dtype
from .backend import routable
from .checks import check_device, check_float, check_non_negative, check_rank, check_shape
from .library import op, qualname, register_composite, register_cuda

MAX_STREAMS = 8  # csrc/mhc/cpu.cpp kMaxStreams


def _check_streams(x, **companions):
    """x: floating [N, n, C] residual streams, 1 <= n <= 8; the companions floating and on x's device."""
    check_float(x, "x")
    check_rank(x, 3, "x")
    if not 1 <= x.shape[1] <= MAX_STREAMS:
        raise ValueError(f"x: n (streams) must be in [1, {MAX_STREAMS}], got {x.shape[1]}")
    for name, t in companions.items():
        check_float(t, name)
        check_device(t, x, name, "x")
    return x.shape


def check_mhc_pre(x, phi, alpha, bias, iters=20):
    _, n, channels = _check_streams(x, phi=phi, alpha=alpha, bias=bias)
    check_shape(phi, "phi", "n*C, n*n + 2n", [n * channels, n * n + 2 * n])
    check_shape(alpha, "alpha", "3", [3])
    check_shape(bias, "bias", "n*n + 2n", [n * n + 2 * n])
    check_non_negative(iters, "iters")


def check_mhc_post(x, f_out, h_post, h_res):
    num_tokens, n, channels = _check_streams(x, f_out=f_out, h_post=h_post, h_res=h_res)
    check_shape(f_out, "f_out", "N, C", [num_tokens, channels])
    check_shape(h_post, "h_post", "N, n", [num_tokens, n])
    check_shape(h_res, "h_res", "N, n, n", [num_tokens, n, n])


def _check_companions(x, companions):
    """(name, tensor, dims, sizes): each floating, on x's device, of its shape."""
    for name, t, dims, sizes in companions:
        check_float(t, name)
        check_device(t, x, name, "x")
        check_shape(t, name, dims, sizes)


def check_mhc_pre_backward(grad_x_in, grad_h_post, grad_h_res, x, phi, alpha, bias, y, r, iters):
    check_mhc_pre(x, phi, alpha, bias, iters)
    tokens, n, channels = x.shape
    _check_companions(x, [("grad_x_in", grad_x_in, "N, C", [tokens, channels]),
                          ("grad_h_post", grad_h_post, "N, n", [tokens, n]),
                          ("grad_h_res", grad_h_res, "N, n, n", [tokens, n, n]),
                          ("y", y, "N, n*n + 2n", [tokens, n * n + 2 * n]),
                          ("r", r, "N", [tokens])])


def check_mhc_post_backward(grad, x, f_out, h_post, h_res):
    check_mhc_post(x, f_out, h_post, h_res)
    _check_companions(x, [("grad", grad, "N, n, C", list(x.shape))])


# ---- fake impls (torch.compile traces these) ---------------------------------------------------


@torch.library.register_fake(qualname("mhc_pre_forward"))
def _pre_forward_fake(x, phi, alpha, bias, iters):
    check_mhc_pre(x, phi, alpha, bias, iters)
    tokens, n, channels = x.shape
    coef = dict(dtype=compute_dtype(x, phi, alpha, bias), device=x.device)
    return (x.new_empty(tokens, channels), torch.empty(tokens, n, **coef), torch.empty(tokens, n, n, **coef),
            torch.empty(tokens, n * n + 2 * n, **coef), torch.empty(tokens, **coef))


def _empty_like_each(*tensors):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors)


@torch.library.register_fake(qualname("mhc_pre_backward"))
def _pre_backward_fake(grad_x_in, grad_h_post, grad_h_res, x, phi, alpha, bias, y, r, iters):
    check_mhc_pre_backward(grad_x_in, grad_h_post, grad_h_res, x, phi, alpha, bias, y, r, iters)
    return _empty_like_each(x, phi, alpha, bias)


@torch.library.register_fake(qualname("mhc_post"))
def _post_fake(x, f_out, h_post, h_res):
    check_mhc_post(x, f_out, h_post, h_res)
    return _empty_like_each(x)[0]


@torch.library.register_fake(qualname("mhc_post_backward"))
def _post_backward_fake(grad, x, f_out, h_post, h_res):
    check_mhc_post_backward(grad, x, f_out, h_post, h_res)
    return _empty_like_each(x, f_out, h_post, h_res)


# ---- CUDA: the Triton kernels ------------------------------------------------------------------


def _pre_forward_cuda(x, phi, alpha, bias, iters):
    check_mhc_pre(x, phi, alpha, bias, iters)
    from ..kernels.mhc import mhc_pre_forward

    return mhc_pre_forward(x, phi, alpha, bias, iters)


def _pre_backward_cuda(grad_x_in, grad_h_post, grad_h_res, x, phi, alpha, bias, y, r, iters):
    check_mhc_pre_backward(grad_x_in, grad_h_post, grad_h_res, x, phi, alpha, bias, y, r, iters)
    from ..kernels.mhc import mhc_pre_backward

    return mhc_pre_backward(grad_x_in, grad_h_post, grad_h_res, x, phi, alpha, bias, y, r, iters)


def _post_cuda(x, f_out, h_post, h_res):
    check_mhc_post(x, f_out, h_post, h_res)
    from ..kernels.mhc import mhc_post_forward

    return mhc_post_forward(x, f_out, h_post, h_res)


def _post_backward_cuda(grad, x, f_out, h_post, h_res):
    check_mhc_post_backward(grad, x, f_out, h_post, h_res)
    from ..kernels.mhc import mhc_post_backward

    return mhc_post_backward(grad, x, f_out, h_post, h_res)


register_cuda("mhc_pre_forward", _pre_forward_cuda)
register_cuda("mhc_pre_backward", _pre_backward_cuda)
register_cuda("mhc_post", _post_cuda)
register_cuda("mhc_post_backward", _post_backward_cuda)


# ---- autograd ------------------------------------------------------------------------------------


def _pre_composite(x, phi, alpha, bias, iters=20):
    x_in, h_post, h_res, _, _ = op("mhc_pre_forward")(x, phi, alpha, bias, iters)
    return x_in, h_post, h_res


register_composite("mhc_pre", _pre_composite)


def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad


def _pre_setup_context(ctx, inputs, output):
    x, phi, alpha, bias, iters = inputs
    _, h_post, h_res, y, r = output
    ctx.mark_non_differentiable(y, r)  # saved for the backward, not outputs of mhc_pre
    ctx.save_for_backward(x, phi, alpha, bias, y, r, h_post, h_res)
    ctx.iters = iters


def _pre_backward(ctx, grad_x_in, grad_h_post, grad_h_res, _grad_y, _grad_r):
    x, phi, alpha, bias, y, r, h_post, h_res = ctx.saved_tensors
    grad_x_in = _zeros_if_none(grad_x_in, x[:, 0])
    grad_h_post, grad_h_res = _zeros_if_none(grad_h_post, h_post), _zeros_if_none(grad_h_res, h_res)
    dx, dphi, dalpha, dbias = op("mhc_pre_backward")(grad_x_in, grad_h_post, grad_h_res, x, phi, alpha, bias, y, r,
                                                     ctx.iters)
    return dx, dphi, dalpha, dbias, None


torch.library.register_autograd(qualname("mhc_pre_forward"), _pre_backward, setup_context=_pre_setup_context)


def _post_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _post_backward(ctx, grad):
    return op("mhc_post_backward")(grad, *ctx.saved_tensors)


torch.library.register_autograd(qualname("mhc_post"), _post_backward, setup_context=_post_setup_context)


@routable("mhc_pre")
def mhc_pre(x, phi, alpha, bias, iters=20):
    """mHC pre-mixing: the layer input and the mixing matrices from n residual streams.

    x: [N, n, C], 1 <= n <= 8; phi: [n*C, n*n + 2n]; alpha: [3]; bias: [n*n + 2n]; all float16, bfloat16,
    float32 or float64, on x's device; iters >= 0 Sinkhorn rounds. With y = flatten(x) @ phi / rms(flatten(x)):
    h_pre = sigmoid(alpha[0] y[:, :n] + bias[:n]), h_post = 2 sigmoid(alpha[1] y[:, n:2n] + bias[n:2n]),
    h_res = sinkhorn(alpha[2] y[:, 2n:] + bias[2n:] as [N, n, n], iters). Returns (x_in [N, C] =
    sum_i h_pre[:, i] x[:, i] in x's dtype, h_post [N, n], h_res [N, n, n]), the last two float32
    (float64 for float64 inputs). Differentiable in x, phi, alpha and bias (a kernel backward).
    """
    return op("mhc_pre")(x, phi, alpha, bias, iters)


@routable("mhc_post")
def mhc_post(x, f_out, h_post, h_res):
    """mHC post-mixing: x_next[:, i] = sum_j h_res[:, i, j] x[:, j] + h_post[:, i] f_out.

    x: [N, n, C], 1 <= n <= 8 (the residual streams); f_out: [N, C] (the layer's output); h_post: [N, n]
    and h_res: [N, n, n] (from mhc_pre); all float16, bfloat16, float32 or float64, on x's device. Returns
    x_next [N, n, C] in x's dtype. Differentiable in all four (a kernel backward).
    """
    return op("mhc_post")(x, f_out, h_post, h_res)

"""mhc_pre, mhc_post: CPU C++ kernels and Triton kernels vs the reference, forward and every gradient,
gradcheck, opcheck, torch.compile, bad input (the same message from C++, Python and fake tensors)."""
import pytest
import torch

import musetalk_fast
from musetalk_fast import reference
from tests.helpers import DEVICES, assert_close_to_reference, backend_device, kernel_backends, seeded

STREAMS = [1, 2, 3, 4, 8]
# (tokens, channels): ragged token counts, C a multiple of 8 and one odd C, and no tokens.
SIZES = [(5, 8), (17, 24), (3, 16), (2, 13), (0, 8)]


def make_pre_args(tokens, n, channels, seed, dtype=torch.float32, device="cpu"):
    g = seeded(seed)
    x = torch.randn(tokens, n, channels, generator=g, dtype=torch.float64)
    phi = torch.randn(n * channels, n * n + 2 * n, generator=g, dtype=torch.float64) / (n * channels) ** 0.5
    alpha = torch.tensor([0.8, 1.2, 1.5], dtype=torch.float64)
    bias = torch.randn(n * n + 2 * n, generator=g, dtype=torch.float64)
    coef = torch.float64 if dtype == torch.float64 else torch.float32
    return x.to(dtype).to(device), phi.to(coef).to(device), alpha.to(coef).to(device), bias.to(coef).to(device)


def make_post_args(tokens, n, channels, seed, dtype=torch.float32, device="cpu"):
    g = seeded(seed)
    x = torch.randn(tokens, n, channels, generator=g, dtype=torch.float64)
    f_out = torch.randn(tokens, channels, generator=g, dtype=torch.float64)
    h_post = 2 * torch.rand(tokens, n, generator=g, dtype=torch.float64)
    h_res = reference.sinkhorn(torch.randn(tokens, n, n, generator=g, dtype=torch.float64))
    coef = torch.float64 if dtype == torch.float64 else torch.float32
    return x.to(dtype).to(device), f_out.to(dtype).to(device), h_post.to(coef).to(device), h_res.to(coef).to(device)


def run_pre(backend, args, grads, iters):
    """(outputs, gradients of every input) of mhc_pre with upstream gradients `grads`."""
    if backend == "triton-interpreter":
        from musetalk_fast.kernels.mhc import mhc_pre_backward, mhc_pre_forward

        x_in, h_post, h_res, y, r = mhc_pre_forward(*args, iters)
        return (x_in, h_post, h_res), mhc_pre_backward(*grads, *args, y, r, iters)
    leaves = [t.detach().requires_grad_() for t in args]
    outs = musetalk_fast.ops.mhc_pre(*leaves, iters)
    return outs, torch.autograd.grad(outs, leaves, grads, allow_unused=True)


def run_post(backend, args, grad):
    if backend == "triton-interpreter":
        from musetalk_fast.kernels.mhc import mhc_post_backward, mhc_post_forward

        return mhc_post_forward(*args), mhc_post_backward(grad, *args)
    leaves = [t.detach().requires_grad_() for t in args]
    out = musetalk_fast.ops.mhc_post(*leaves)
    return out, torch.autograd.grad(out, leaves, grad)


def exact_pre(args, grads, iters):
    leaves = [t.detach().double().cpu().requires_grad_() for t in args]
    outs = reference.mhc_pre(*leaves, iters)
    if outs[0].numel() == 0:
        return outs, [torch.zeros_like(t) for t in leaves]
    return outs, torch.autograd.grad(outs, leaves, [g.double().cpu() for g in grads])


TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-11, rtol=1e-9)}


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", STREAMS)
def test_pre_forward_and_gradients_match_reference(backend, dtype, n):
    device = backend_device(backend)
    for seed, ((tokens, channels), iters) in enumerate(zip(SIZES, [20, 7, 1, 0, 20])):
        args = make_pre_args(tokens, n, channels, seed, dtype, device)
        g = seeded(50 + seed)
        coef = args[1].dtype
        grads = (torch.randn(tokens, channels, generator=g, dtype=torch.float64).to(dtype).to(device),
                 torch.randn(tokens, n, generator=g, dtype=torch.float64).to(coef).to(device),
                 torch.randn(tokens, n, n, generator=g, dtype=torch.float64).to(coef).to(device))
        outs, got_grads = run_pre(backend, args, grads, iters)
        want, want_grads = exact_pre(args, grads, iters)
        for name, got, exact in zip(("x_in", "h_post", "h_res"), outs, want):
            assert got.dtype == (dtype if name == "x_in" else coef)
            assert_close_to_reference(got, exact, name=f"{name} n={n} N={tokens} C={channels}", **TOLERANCE[dtype])
        for name, got, exact, arg in zip(("dx", "dphi", "dalpha", "dbias"), got_grads, want_grads, args):
            assert got.dtype == arg.dtype and got.shape == arg.shape
            assert_close_to_reference(got, exact, name=f"{name} n={n} N={tokens} C={channels} iters={iters}",
                                      **TOLERANCE[dtype])
        # four gradients in four storages (views of one buffer would alias the op's outputs: opcheck refuses)
        assert len({g.untyped_storage().data_ptr() for g in got_grads}) == 4


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", STREAMS)
def test_post_forward_and_gradients_match_reference(backend, dtype, n):
    device = backend_device(backend)
    for seed, (tokens, channels) in enumerate(SIZES):
        args = make_post_args(tokens, n, channels, seed, dtype, device)
        grad = torch.randn(tokens, n, channels, generator=seeded(70 + seed), dtype=torch.float64)
        out, got_grads = run_post(backend, args, grad.to(dtype).to(device))
        leaves = [t.detach().double().cpu().requires_grad_() for t in args]
        exact = reference.mhc_post(*leaves)
        exact_grads = torch.autograd.grad(exact, leaves, grad)
        assert out.dtype == dtype
        assert_close_to_reference(out, exact, name=f"x_next n={n} N={tokens}", **TOLERANCE[dtype])
        for name, got, want, arg in zip(("dx", "df_out", "dh_post", "dh_res"), got_grads, exact_grads, args):
            assert got.dtype == arg.dtype and got.shape == arg.shape
            assert_close_to_reference(got, want, name=f"{name} n={n} N={tokens}", **TOLERANCE[dtype])


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_streams(backend, dtype):
    """Low-precision streams, float32 coefficients: within twice PyTorch's own error at that dtype."""
    device = backend_device(backend)
    n, tokens, channels = 4, 9, 16
    args = make_pre_args(tokens, n, channels, 3, dtype, device)
    grads = (torch.randn(tokens, channels, generator=seeded(4)).to(dtype).to(device),
             torch.randn(tokens, n, generator=seeded(5)).to(device), torch.randn(tokens, n, n, generator=seeded(6)).to(device))
    outs, got_grads = run_pre(backend, args, grads, 20)
    want, want_grads = exact_pre(args, grads, 20)
    lowp = [t.detach().double().cpu().requires_grad_() for t in args]
    lowp_outs = reference.mhc_pre(lowp[0].to(dtype), lowp[1].float(), lowp[2].float(), lowp[3].float(), 20)
    lowp_grads = torch.autograd.grad(lowp_outs, lowp, [g.cpu() for g in grads])
    for name, got, exact, same in zip(("x_in", "h_post", "h_res"), outs, want, lowp_outs):
        assert_close_to_reference(got, exact, same, name=name)
    for name, got, exact, same in zip(("dx", "dphi", "dalpha", "dbias"), got_grads, want_grads, lowp_grads):
        assert_close_to_reference(got, exact, same.to(got.dtype), name=name)

    post = make_post_args(tokens, n, channels, 7, dtype, device)
    grad = torch.randn(tokens, n, channels, generator=seeded(8)).to(dtype).to(device)
    out, got_grads = run_post(backend, post, grad)
    exact_leaves = [t.detach().double().cpu().requires_grad_() for t in post]
    exact = reference.mhc_post(*exact_leaves)
    exact_grads = torch.autograd.grad(exact, exact_leaves, grad.double().cpu())
    assert_close_to_reference(out, exact, reference.mhc_post(*[t.cpu() for t in post]), name="x_next")
    lowp = [t.detach().cpu().requires_grad_() for t in post]
    lowp_grads = torch.autograd.grad(reference.mhc_post(*lowp), lowp, grad.cpu())
    for name, got, want, same in zip(("dx", "df_out", "dh_post", "dh_res"), got_grads, exact_grads, lowp_grads):
        assert_close_to_reference(got, want, same, name=name)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float64_coefficients_keep_x_in_in_the_streams_dtype(backend, dtype):
    """Streams of a lower dtype with float64 coefficients: the kernels read x in float64, yet x_in is in
    x's dtype (as the reference, the C++ kernel and the fake impl say), h_post and h_res float64."""
    device = backend_device(backend)
    x, phi, alpha, bias = make_pre_args(6, 4, 16, 21, torch.float64, device)
    args = (x.to(dtype), phi, alpha, bias)
    g = seeded(22)
    grads = (torch.randn(6, 16, generator=g, dtype=torch.float64).to(dtype).to(device),
             torch.randn(6, 4, generator=g, dtype=torch.float64).to(device),
             torch.randn(6, 4, 4, generator=g, dtype=torch.float64).to(device))
    outs, got_grads = run_pre(backend, args, grads, 20)
    want, want_grads = exact_pre(args, grads, 20)
    assert [t.dtype for t in outs] == [dtype, torch.float64, torch.float64]
    assert [t.dtype for t in got_grads] == [dtype, torch.float64, torch.float64, torch.float64]
    same_math = reference.mhc_pre(*[t.cpu() for t in args], 20)  # float64 math, x_in rounded to dtype
    for name, got, exact, same in zip(("x_in", "h_post", "h_res"), outs, want, same_math):
        assert_close_to_reference(got, exact, same if dtype == torch.bfloat16 else None, name=name,
                                  **({} if dtype == torch.bfloat16 else TOLERANCE[torch.float32]))


@pytest.mark.parametrize("backend", kernel_backends())
def test_h_res_is_doubly_stochastic(backend):
    args = make_pre_args(33, 4, 16, 11, torch.float32, backend_device(backend))
    if backend == "triton-interpreter":
        from musetalk_fast.kernels.mhc import mhc_pre_forward

        _, h_post, h_res, _, _ = mhc_pre_forward(*args, 100)
    else:
        _, h_post, h_res = musetalk_fast.ops.mhc_pre(*args, 100)
    torch.testing.assert_close(h_res.sum(-1).cpu(), torch.ones(33, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(h_res.sum(-2).cpu(), torch.ones(33, 4), atol=1e-3, rtol=0)
    assert (h_res >= 0).all() and ((h_post > 0) & (h_post < 2)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    pre = [t.requires_grad_() for t in make_pre_args(3, 3, 8, 1, torch.float64, device)]
    assert torch.autograd.gradcheck(lambda *a: musetalk_fast.ops.mhc_pre(*a, 6), pre)
    post = [t.requires_grad_() for t in make_post_args(3, 3, 8, 2, torch.float64, device)]
    assert torch.autograd.gradcheck(musetalk_fast.ops.mhc_post, post)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    ops = torch.ops.musetalk_fast
    for n in (2, 4):
        x, phi, alpha, bias = [t.requires_grad_() for t in make_pre_args(4, n, 8, n, torch.float32, device)]
        torch.library.opcheck(ops.mhc_pre_forward.default, (x, phi, alpha, bias, 5))
        x_in, h_post, h_res, y, r = ops.mhc_pre_forward(x.detach(), phi.detach(), alpha.detach(), bias.detach(), 5)
        grads = (torch.randn_like(x_in), torch.randn_like(h_post), torch.randn_like(h_res))
        torch.library.opcheck(ops.mhc_pre_backward.default, (*grads, x.detach(), phi.detach(), alpha.detach(),
                                                             bias.detach(), y, r, 5))
        post = [t.requires_grad_() for t in make_post_args(4, n, 8, n, torch.float32, device)]
        torch.library.opcheck(ops.mhc_post.default, tuple(post))
        torch.library.opcheck(ops.mhc_post_backward.default,
                              (torch.randn_like(post[0]), *(t.detach() for t in post)))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """One mHC layer around a linear layer, compiled whole: forward and every gradient match eager."""
    layer = torch.nn.Linear(8, 8, dtype=torch.float32, device=device)

    def loss_fn(x, phi, alpha, bias):
        x_in, h_post, h_res = musetalk_fast.ops.mhc_pre(x, phi, alpha, bias, 6)
        return musetalk_fast.ops.mhc_post(x, layer(x_in), h_post, h_res).square().sum()

    args = make_pre_args(5, 4, 8, 9, torch.float32, device)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in args]
        loss = fn(*leaves)
        return (loss, *torch.autograd.grad(loss, leaves))

    torch._dynamo.reset()
    for got, want in zip(run(torch.compile(loss_fn, fullgraph=True)), run(loss_fn), strict=True):
        torch.testing.assert_close(got, want)


def test_non_contiguous_inputs():
    x, phi, alpha, bias = make_pre_args(6, 4, 8, 12, torch.float64)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    phi_t = phi.t().contiguous().t()
    for got, want in zip(musetalk_fast.ops.mhc_pre(x_t, phi_t, alpha, bias), reference.mhc_pre(x, phi, alpha, bias)):
        torch.testing.assert_close(got, want)
    post = make_post_args(6, 4, 8, 13, torch.float64)
    torch.testing.assert_close(musetalk_fast.ops.mhc_post(x_t, post[1][:, :].t().contiguous().t(), *post[2:]),
                               reference.mhc_post(x, post[1], *post[2:]))


def test_docstrings():
    for fn in (musetalk_fast.ops.mhc_pre, musetalk_fast.ops.mhc_post):
        assert "Returns" in fn.__doc__ and "Differentiable" in fn.__doc__


# ---- bad input: the whole message, the same from C++ (CPU tensors), Python (CUDA) and fake tensors ----

FLOATS = "float16, bfloat16, float32 or float64"
META = "cpu, got meta"


def pre_args(**changes):
    args = dict(x=torch.randn(3, 2, 5), phi=torch.randn(10, 8), alpha=torch.tensor([0.5, 1.0, 2.0]),
                bias=torch.randn(8), iters=20)
    return {**args, **changes}


def post_args(**changes):
    args = dict(x=torch.randn(3, 2, 5), f_out=torch.randn(3, 5), h_post=torch.rand(3, 2), h_res=torch.rand(3, 2, 2))
    return {**args, **changes}


def pre_backward_args(**changes):
    args = dict(grad_x_in=torch.randn(3, 5), grad_h_post=torch.randn(3, 2), grad_h_res=torch.randn(3, 2, 2),
                **{k: v for k, v in pre_args().items() if k != "iters"}, y=torch.randn(3, 8), r=torch.ones(3), iters=4)
    return {**args, **changes}


def post_backward_args(**changes):
    return {"grad": torch.randn(3, 2, 5), **post_args(), **changes}


BAD_INPUTS = [
    ("mhc_pre", TypeError, f"x must be {FLOATS}, got int64", pre_args(x=torch.zeros(3, 2, 5, dtype=torch.int64))),
    ("mhc_pre", TypeError, f"phi must be {FLOATS}, got int64", pre_args(phi=torch.zeros(10, 8, dtype=torch.int64))),
    ("mhc_pre", TypeError, f"alpha must be {FLOATS}, got int64", pre_args(alpha=torch.tensor([1, 1, 1]))),
    ("mhc_pre", TypeError, f"bias must be {FLOATS}, got bool", pre_args(bias=torch.zeros(8, dtype=torch.bool))),
    ("mhc_pre", ValueError, "x must have rank 3, got shape [3, 10]", pre_args(x=torch.randn(3, 10))),
    ("mhc_pre", ValueError, "x: n (streams) must be in [1, 8], got 9", pre_args(x=torch.randn(3, 9, 5))),
    ("mhc_pre", ValueError, "x: n (streams) must be in [1, 8], got 0", pre_args(x=torch.randn(3, 0, 5))),
    ("mhc_pre", ValueError, "phi must have shape [n*C, n*n + 2n] = [10, 8], got [10, 7]", pre_args(phi=torch.randn(10, 7))),
    ("mhc_pre", ValueError, "phi must have shape [n*C, n*n + 2n] = [10, 8], got [9, 8]", pre_args(phi=torch.randn(9, 8))),
    ("mhc_pre", ValueError, "phi must have shape [n*C, n*n + 2n] = [10, 8], got [80]", pre_args(phi=torch.randn(80))),
    ("mhc_pre", ValueError, "alpha must have shape [3], got [2]", pre_args(alpha=torch.ones(2))),
    ("mhc_pre", ValueError, "alpha must have shape [3], got []", pre_args(alpha=torch.tensor(1.0))),
    ("mhc_pre", ValueError, "bias must have shape [n*n + 2n] = [8], got [7]", pre_args(bias=torch.zeros(7))),
    ("mhc_pre", ValueError, f"phi must be on x's device {META}", pre_args(phi=torch.randn(10, 8, device="meta"))),
    ("mhc_pre", ValueError, f"bias must be on x's device {META}", pre_args(bias=torch.zeros(8, device="meta"))),
    ("mhc_pre", ValueError, "iters must be >= 0, got -5", pre_args(iters=-5)),
    ("mhc_post", TypeError, f"x must be {FLOATS}, got int32", post_args(x=torch.zeros(3, 2, 5, dtype=torch.int32))),
    ("mhc_post", TypeError, f"h_res must be {FLOATS}, got int64",
     post_args(h_res=torch.zeros(3, 2, 2, dtype=torch.int64))),
    ("mhc_post", ValueError, "x must have rank 3, got shape [1, 3, 2, 5]", post_args(x=torch.randn(1, 3, 2, 5))),
    ("mhc_post", ValueError, "x: n (streams) must be in [1, 8], got 12", post_args(x=torch.randn(3, 12, 5))),
    ("mhc_post", ValueError, "f_out must have shape [N, C] = [3, 5], got [3, 4]", post_args(f_out=torch.randn(3, 4))),
    ("mhc_post", ValueError, "f_out must have shape [N, C] = [3, 5], got [3, 2, 5]",
     post_args(f_out=torch.randn(3, 2, 5))),
    ("mhc_post", ValueError, "h_post must have shape [N, n] = [3, 2], got [3, 3]", post_args(h_post=torch.rand(3, 3))),
    ("mhc_post", ValueError, "h_res must have shape [N, n, n] = [3, 2, 2], got [3, 2]", post_args(h_res=torch.rand(3, 2))),
    ("mhc_post", ValueError, "h_res must have shape [N, n, n] = [3, 2, 2], got [2, 2, 2]",
     post_args(h_res=torch.rand(2, 2, 2))),
    ("mhc_post", ValueError, f"f_out must be on x's device {META}", post_args(f_out=torch.randn(3, 5, device="meta"))),
    ("mhc_post", ValueError, f"h_res must be on x's device {META}", post_args(h_res=torch.rand(3, 2, 2, device="meta"))),
    ("mhc_pre_backward", ValueError, "grad_x_in must have shape [N, C] = [3, 5], got [3, 4]",
     pre_backward_args(grad_x_in=torch.randn(3, 4))),
    ("mhc_pre_backward", TypeError, f"grad_h_post must be {FLOATS}, got int64",
     pre_backward_args(grad_h_post=torch.zeros(3, 2, dtype=torch.int64))),
    ("mhc_pre_backward", ValueError, "grad_h_res must have shape [N, n, n] = [3, 2, 2], got [3, 4]",
     pre_backward_args(grad_h_res=torch.randn(3, 4))),
    ("mhc_pre_backward", ValueError, "y must have shape [N, n*n + 2n] = [3, 8], got [3, 7]",
     pre_backward_args(y=torch.randn(3, 7))),
    ("mhc_pre_backward", ValueError, "r must have shape [N] = [3], got [3, 1]", pre_backward_args(r=torch.ones(3, 1))),
    ("mhc_pre_backward", ValueError, "phi must have shape [n*C, n*n + 2n] = [10, 8], got [10, 7]",
     pre_backward_args(phi=torch.randn(10, 7))),
    ("mhc_post_backward", ValueError, "grad must have shape [N, n, C] = [3, 2, 5], got [3, 2, 4]",
     post_backward_args(grad=torch.randn(3, 2, 4))),
    ("mhc_post_backward", ValueError, f"grad must be on x's device {META}",
     post_backward_args(grad=torch.randn(3, 2, 5, device="meta"))),
]


def _call(name, args):
    fn = getattr(musetalk_fast.ops, name, None) or getattr(torch.ops.musetalk_fast, name)
    return fn(**args) if name in ("mhc_pre", "mhc_post") else fn(*args.values())


@pytest.mark.parametrize("mode", ["eager"] + [f"on {d}" for d in DEVICES if d != "cpu"] + ["fake"])
@pytest.mark.parametrize("name,error,message,args", BAD_INPUTS, ids=[f"{b[0]}: {b[2][:40]}" for b in BAD_INPUTS])
def test_bad_input_raises_the_whole_message(mode, name, error, message, args):
    if mode == "fake":  # the fake impls, which torch.compile traces, check the same
        with pytest.raises(error) as raised, torch._subclasses.fake_tensor.FakeTensorMode() as fake:
            _call(name, {k: fake.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    else:
        device = "cpu" if mode == "eager" else mode.split()[-1]
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
                 for k, v in args.items()}
        expected = message.replace("device cpu", f"device {moved['x'].device}")
        with pytest.raises(error) as raised:
            _call(name, moved)
        message = expected
    assert str(raised.value).splitlines()[0] == message

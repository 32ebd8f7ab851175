"""sinkhorn: CPU C++ kernel and Triton kernel vs the reference, gradients, gradcheck, opcheck,
torch.compile, bad input."""
import pytest
import torch

import musetalk_fast
from musetalk_fast import reference
from musetalk_fast.ops.library import has_cuda_kernel
from tests.helpers import (DEVICES, HAS_CUDA, TRITON_INTERPRETED, assert_close_to_reference, backend_device,
                           float_arguments_as_on_a_gpu, kernel_backends, seeded)

SHAPES = [(1, 1), (3, 2), (5, 3), (2, 3, 4), (17, 4), (4, 5), (2, 7), (3, 16), (0, 4), (2, 0, 4), (4, 0)]
ITERS = [0, 1, 7, 20]


def run_forward(backend, logits, iters, eps):
    if backend == "triton-interpreter":
        from musetalk_fast.kernels.sinkhorn import sinkhorn_forward

        return sinkhorn_forward(logits, iters, eps)
    return musetalk_fast.ops.sinkhorn(logits, iters, eps)


def run_backward(backend, grad, logits, iters, eps):
    if backend == "triton-interpreter":
        from musetalk_fast.kernels.sinkhorn import sinkhorn_backward

        return sinkhorn_backward(grad, logits, iters, eps)
    x = logits.detach().requires_grad_()
    (grad_logits,) = torch.autograd.grad(musetalk_fast.ops.sinkhorn(x, iters, eps), x, grad)
    return grad_logits


def make_logits(shape, seed, dtype, device, scale=2.0):
    *batch, n = shape
    return (torch.randn(*batch, n, n, generator=seeded(seed), dtype=torch.float64) * scale).to(dtype).to(device)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference(backend, dtype, shape):
    device = backend_device(backend)
    for seed, iters in enumerate(ITERS):
        logits = make_logits(shape, seed, dtype, device)
        eps = 1e-6
        exact_in = logits.detach().double().cpu().requires_grad_()
        exact = reference.sinkhorn(exact_in, iters, eps)
        grad = torch.randn(exact.shape, generator=seeded(100 + seed), dtype=torch.float64)
        (exact_grad,) = torch.autograd.grad(exact, exact_in, grad) if exact.numel() else (torch.zeros_like(exact),)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
        out = run_forward(backend, logits, iters, eps)
        assert out.dtype == dtype and out.is_contiguous()
        assert_close_to_reference(out, exact, name=f"P iters={iters}", **tol)
        grad_logits = run_backward(backend, grad.to(dtype).to(device), logits, iters, eps)
        assert_close_to_reference(grad_logits, exact_grad, name=f"dlogits iters={iters}", **tol)


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="emulates on CPU tensors what a GPU launch does to float arguments")
@pytest.mark.parametrize("iters", [3, 40], ids=["unrolled", "recomputed"])
def test_float64_exact_when_eps_arrives_as_float32(monkeypatch, iters):
    """On a GPU the kernels' float argument eps is float32: float64 must still use it exactly
    (kernels/float64_scalars.py). A large eps (0.3, against sums of about 1) makes the difference show."""
    from musetalk_fast.kernels import sinkhorn as sk

    for name in ("sinkhorn_fwd_kernel", "sinkhorn_bwd_kernel"):
        monkeypatch.setattr(sk, name, float_arguments_as_on_a_gpu(getattr(sk, name)))
    logits = make_logits((5, 4), 31, torch.float64, "cpu")
    exact_in = logits.clone().requires_grad_()
    exact = reference.sinkhorn(exact_in, iters, 0.3)
    grad = torch.randn(exact.shape, generator=seeded(32), dtype=torch.float64)
    (exact_grad,) = torch.autograd.grad(exact, exact_in, grad)
    torch.testing.assert_close(sk.sinkhorn_forward(logits, iters, 0.3), exact.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(sk.sinkhorn_backward(grad, logits, iters, 0.3), exact_grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", kernel_backends())
def test_backward_above_the_unroll_cap(backend):
    """Past MAX_UNROLLED_ITERS (and for float64) the GPU backward recomputes each step instead of
    unrolling: the same gradient."""
    from musetalk_fast.kernels.sinkhorn import MAX_UNROLLED_ITERS

    device = backend_device(backend)
    iters = MAX_UNROLLED_ITERS + 3
    for dtype, tol in ((torch.float32, dict(atol=1e-5, rtol=1e-5)), (torch.float64, dict(atol=1e-12, rtol=1e-10))):
        logits = make_logits((3, 3), 21, dtype, device)
        exact_in = logits.detach().double().cpu().requires_grad_()
        grad = torch.randn(3, 3, 3, generator=seeded(22), dtype=torch.float64)
        (exact,) = torch.autograd.grad(reference.sinkhorn(exact_in, iters), exact_in, grad)
        got = run_backward(backend, grad.to(dtype).to(device), logits, iters, 1e-6)
        assert_close_to_reference(got, exact, name=f"dlogits iters={iters} {dtype}", **tol)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, dtype):
    device = backend_device(backend)
    logits = make_logits((6, 4), 3, dtype, device)
    exact = reference.sinkhorn(logits.double().cpu())
    same_math = reference.sinkhorn(logits.float().cpu()).to(dtype)  # the kernel computes in fp32, stores dtype
    out = run_forward(backend, logits, 20, 1e-6)
    assert out.dtype == dtype
    assert_close_to_reference(out, exact, same_math, name="P")


@pytest.mark.parametrize("backend", kernel_backends())
def test_output_is_doubly_stochastic(backend):
    logits = make_logits((64, 4), 7, torch.float32, backend_device(backend))
    p = run_forward(backend, logits, 50, 1e-9)
    torch.testing.assert_close(p.sum(-1).cpu(), torch.ones(64, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.sum(-2).cpu(), torch.ones(64, 4), atol=1e-3, rtol=0)
    assert (p >= 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    base = make_logits((6, 4), 1, torch.float64, device)
    logits = base.transpose(-1, -2)  # a non-contiguous view
    torch.testing.assert_close(musetalk_fast.ops.sinkhorn(logits, 5), reference.sinkhorn(logits, 5))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    logits = make_logits((3, 4), 2, torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: musetalk_fast.ops.sinkhorn(x, 6, 1e-6), (logits,))
    assert torch.autograd.gradcheck(lambda x: musetalk_fast.ops.sinkhorn(x, 1, 0.0), (logits,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for shape in [(3, 4), (2, 2, 3)]:
        logits = make_logits(shape, 4, torch.float32, device).requires_grad_()
        torch.library.opcheck(torch.ops.musetalk_fast.sinkhorn.default, (logits, 5, 1e-6))
        grad = torch.randn_like(logits)
        torch.library.opcheck(torch.ops.musetalk_fast.sinkhorn_backward.default, (grad, logits.detach(), 5, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def loss_fn(logits):
        return (musetalk_fast.ops.sinkhorn(logits, 8) ** 2).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    logits = make_logits((5, 4), 5, torch.float32, device).requires_grad_()
    loss = compiled(logits)
    (grad,) = torch.autograd.grad(loss, logits)
    x = logits.detach().requires_grad_()
    (expected,) = torch.autograd.grad(loss_fn(x), x)
    torch.testing.assert_close(loss, loss_fn(logits.detach()))
    torch.testing.assert_close(grad, expected)


# Each kind of bad input with its whole message, the same from the C++ checks (CPU tensors) and the
# Python ones (CUDA tensors, fake tensors).
BAD_INPUTS = [
    (lambda: (torch.zeros(3, 4, dtype=torch.int64), 20, 1e-6), TypeError,
     "logits must be float16, bfloat16, float32 or float64, got int64"),
    (lambda: (torch.zeros(4), 20, 1e-6), ValueError, "logits must have shape [..., n, n], got [4]"),
    (lambda: (torch.zeros(2, 3, 4), 20, 1e-6), ValueError, "logits must have shape [..., n, n], got [2, 3, 4]"),
    (lambda: (torch.zeros(2, 17, 17), 20, 1e-6), ValueError, "logits: n must be at most 16, got 17"),
    (lambda: (torch.zeros(2, 4, 4), -1, 1e-6), ValueError, "iters must be >= 0, got -1"),
    (lambda: (torch.zeros(2, 4, 4), 3, -1.0), ValueError, "eps must be >= 0, got -1"),
    (lambda: (torch.zeros(2, 4, 4), 3, -2.5e-7), ValueError, "eps must be >= 0, got -2.5e-07"),
]


@pytest.mark.parametrize("device", DEVICES + ["fake"])
@pytest.mark.parametrize("make_args,error,message", BAD_INPUTS, ids=[b[2][:30] for b in BAD_INPUTS])
def test_bad_input_raises_the_whole_message(device, make_args, error, message):
    logits, *rest = make_args()
    if device == "fake":  # the fake impl, which torch.compile traces, checks the same
        with pytest.raises(error) as raised, torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            musetalk_fast.ops.sinkhorn(mode.from_tensor(logits), *rest)
    else:
        with pytest.raises(error) as raised:
            musetalk_fast.ops.sinkhorn(logits.to(device), *rest)
    assert str(raised.value).splitlines()[0] == message


@pytest.mark.parametrize("device", DEVICES)
def test_backward_rejects_mismatched_grad(device):
    with pytest.raises(ValueError) as raised:
        torch.ops.musetalk_fast.sinkhorn_backward(torch.zeros(2, 3, 3, device=device),
                                                  torch.zeros(2, 4, 4, device=device), 3, 1e-6)
    assert str(raised.value).splitlines()[0] == "grad must have the shape of logits [2, 4, 4], got [2, 3, 3]"


@pytest.mark.skipif(not HAS_CUDA or not has_cuda_kernel("sinkhorn_cudacpp"), reason="needs a GPU and the CUDA C++ build")
def test_cuda_cpp_candidate_matches_triton_and_the_reference():
    """Against Triton at the benchmark's n and iters, and each of its kernels (kept sums for n <= 4 and
    iters <= 20, the recomputing one past 20 iters, another unrolled n, the run-time n, float64) against
    the float64 reference. fp32 tolerances are twice the Triton tests': each side has its own
    approximations (__expf and --use_fast_math division here, ex2.approx and div.full in Triton)."""
    tol = dict(atol=2e-5, rtol=2e-5)
    logits = make_logits((257, 4), 9, torch.float32, "cuda")
    grad = torch.randn_like(logits)
    torch.testing.assert_close(torch.ops.musetalk_fast.sinkhorn_cudacpp(logits, 20, 1e-6),
                               musetalk_fast.ops.sinkhorn(logits, 20, 1e-6), **tol)
    torch.testing.assert_close(torch.ops.musetalk_fast.sinkhorn_backward_cudacpp(grad, logits, 20, 1e-6),
                               torch.ops.musetalk_fast.sinkhorn_backward(grad, logits, 20, 1e-6), **tol)
    for n, iters, dtype in ((4, 25, torch.float32), (3, 20, torch.float32), (11, 20, torch.float32),
                            (4, 7, torch.float64)):
        logits = make_logits((33, n), 12 + n, dtype, "cuda")
        exact_in = logits.detach().double().cpu().requires_grad_()
        exact = reference.sinkhorn(exact_in, iters, 1e-6)
        grad = torch.randn(exact.shape, generator=seeded(13), dtype=torch.float64)
        (exact_grad,) = torch.autograd.grad(exact, exact_in, grad)
        close = tol if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
        name = f"n={n} iters={iters} {dtype}"
        assert_close_to_reference(torch.ops.musetalk_fast.sinkhorn_cudacpp(logits, iters, 1e-6), exact,
                                  name=f"P {name}", **close)
        assert_close_to_reference(torch.ops.musetalk_fast.sinkhorn_backward_cudacpp(
            grad.to(dtype).to("cuda"), logits, iters, 1e-6), exact_grad, name=f"dlogits {name}", **close)

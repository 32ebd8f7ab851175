"""Where Python registers into the `musetalk_fast` library the C++ extension defined."""
import functools

import torch

NAMESPACE = "musetalk_fast"
LIB = torch.library.Library(NAMESPACE, "IMPL")


def qualname(name):
    return f"{NAMESPACE}::{name}"


def op(name):
    return getattr(torch.ops.musetalk_fast, name)


def _first_cuda_device(args):
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.is_cuda:
            return arg.device
        if isinstance(arg, (list, tuple)):
            device = _first_cuda_device(arg)
            if device is not None:
                return device
    return None


def on_the_tensors_device(fn):
    """`fn` run with its first CUDA tensor argument's device current. Triton launches on the current
    device, not on the tensors' (and a Python kernel gets no device guard from the dispatcher, as a C++
    one does), so tensors on a second GPU would otherwise be handed to a kernel running on the first."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = _first_cuda_device(args)
        if device is None:
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return run


def has_cuda_kernel(name):
    """Whether op `name` has a CUDA kernel in this build. Every schema is defined in every build
    (csrc/registration.cpp), so hasattr(torch.ops.musetalk_fast, name) is always true; the CUDA C++
    candidates (`*_cudacpp`) get their kernel only where nvcc compiled them."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname(name), "CUDA")


def register_cuda(name, fn):
    """The CUDA kernel of `name` (a Triton launcher), run on its tensors' device."""
    LIB.impl(name, on_the_tensors_device(fn), "CUDA")


def register_composite(name, fn):
    """Implement `name` on every device by `fn`, a composition of other ops: autograd flows through
    those ops and torch.compile traces into them (CompositeImplicitAutograd)."""
    LIB.impl(name, fn, "CompositeImplicitAutograd")

"""Where Python registers into the `musetalk_fast` library the C++ extension defined."""
import torch

NAMESPACE = "musetalk_fast"
LIB = torch.library.Library(NAMESPACE, "IMPL")


def qualname(name):
    return f"{NAMESPACE}::{name}"


def op(name):
    return getattr(torch.ops.musetalk_fast, name)


def register_cuda(name, fn):
    """The CUDA kernel of `name` (a Triton launcher)."""
    LIB.impl(name, fn, "CUDA")


def register_composite(name, fn):
    """Implement `name` on every device by `fn`, a composition of other ops: autograd flows through
    those ops and torch.compile traces into them (CompositeImplicitAutograd)."""
    LIB.impl(name, fn, "CompositeImplicitAutograd")

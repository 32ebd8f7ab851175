"""Where Python registers into the `musetalk_fast` library the C++ extension defined."""
import os

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


def register_reference(name, fn):
    """Route `name` through its pure-PyTorch reference on every device, autograd included.

    For ops whose kernels are not written yet: the op works everywhere, and torch.compile traces
    through the reference's torch ops.
    """
    LIB.impl(name, fn, "CompositeImplicitAutograd")


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"

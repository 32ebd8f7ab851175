"""The reference-ops switch: run a model on musetalk_fast/reference.py instead of the kernels.

    with musetalk_fast.ops.use_reference_ops():     # or set_reference_ops(True) / (False)
        out = model(x)                               # every public op wrapper calls reference.<op>

Every public wrapper of musetalk_fast.ops (and so every nn module built on them) checks the switch
when it is called and then calls the function of the same name in musetalk_fast.reference, with the
same arguments, instead of torch.ops.musetalk_fast. The same model with the same weights therefore
runs on either, under autograd (the reference functions are plain PyTorch). The switch is one
Python-level global read at call time (torch.compile guards on it); it is process-wide, not per thread.
"""
import contextlib
import functools

from .. import reference

_reference_ops = False


def reference_ops_enabled():
    """Whether the public op wrappers call musetalk_fast.reference now."""
    return _reference_ops


def set_reference_ops(enabled=True):
    """Route every public op wrapper to musetalk_fast.reference (True) or to the kernels (False).
    Returns the previous setting."""
    global _reference_ops
    previous, _reference_ops = _reference_ops, bool(enabled)
    return previous


@contextlib.contextmanager
def use_reference_ops(enabled=True):
    """A context in which the public op wrappers call musetalk_fast.reference (enabled=True) or the
    kernels (enabled=False); the previous setting comes back on exit, exceptions included."""
    previous = set_reference_ops(enabled)
    try:
        yield
    finally:
        set_reference_ops(previous)


def routable(name):
    """Decorator of the public wrapper of op `name`: with the switch on it calls reference.<name>
    (looked up at call time) with the same arguments instead."""
    def decorate(wrapper):
        @functools.wraps(wrapper)
        def call(*args, **kwargs):
            if _reference_ops:
                return getattr(reference, name)(*args, **kwargs)
            return wrapper(*args, **kwargs)

        call.reference_name = name
        return call

    return decorate

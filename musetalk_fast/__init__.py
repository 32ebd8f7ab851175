"""musetalk_fast: Triton and CUDA kernels for gated/sparse attention, mHC and Engram.

`import musetalk_fast` registers every op of docs/ops.md as torch.ops.musetalk_fast.<name>
(schemas and CPU kernels from the C++ extension, fake impls, autograd and the Triton CUDA kernels
from musetalk_fast.ops), and exposes them as plain functions in musetalk_fast.ops.
"""
import torch  # noqa: F401  (first: the extension links against its libraries)

from . import _C  # noqa: F401, E402  (loads the extension: schemas + CPU kernels)
from . import nn, ops, reference  # noqa: F401, E402

__version__ = "0.1.0"

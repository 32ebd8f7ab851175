"""Exact float scalars (softmax scales) for the float64 kernels.

Triton passes a Python float argument to a GPU kernel as float32 (`triton.runtime.jit.mangle_type(0.1)
== "fp32"`; the interpreter keeps the float64 value, so CPU tests cannot see it): a relative error up
to 6e-8, which float64 kernels, held to 1e-10 against the reference and used for gradcheck, cannot take.
For float64 inputs the launchers therefore also pass each such scalar as a constexpr `<NAME>_F64`, and
the kernel takes `exact_scalar(value, NAME_F64, ACC)`: a float64 constant made by tl.full, exact on the GPU
and in the interpreter (which rounds a bare constexpr float operand to float32). The other dtypes
compute in float32 and keep the plain argument: one compiled kernel for every scale.
"""
import torch
import triton
import triton.language as tl


def float64_scalars(dtype, **scalars):
    """{"<NAME>_F64": value} for each keyword when `dtype` is float64; {} otherwise."""
    if dtype != torch.float64:
        return {}
    return {f"{name.upper()}_F64": float(value) for name, value in scalars.items()}


@triton.jit
def exact_scalar(value, EXACT: tl.constexpr, ACC: tl.constexpr):
    """`value` (a float argument), or the constexpr EXACT as an exact ACC scalar where one was passed."""
    if EXACT is not None:  # one return: the compiler types every return statement, even one it never reaches
        result = tl.full((), EXACT, ACC)
    else:
        result = value
    return result

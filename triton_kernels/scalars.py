"""Exact float scalars in Triton kernels.

A Python float passed to a kernel arrives as float32 unless its parameter is annotated `tl.float64`, and float64
results then lose half their digits. Kernels annotate such parameters `tl.float64` and convert them with `as_dtype`,
which works the same compiled and in the interpreter (where `tl.cast` of a Python float goes through float32).
"""
import triton
import triton.language as tl


@triton.jit
def as_dtype(value, dtype: tl.constexpr):
    """A tl.float64 kernel parameter (or, in the interpreter, a Python float) as a scalar of dtype, rounded once."""
    return (value + tl.zeros((), tl.float64)).to(dtype)

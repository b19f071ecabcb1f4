"""Reference integer runtime: ``QuantLinear`` → int8 × int8 → int32 GEMMs, bit-exact with the fake-quant path.

>>> report = to_integer_runtime(model)          # doctest: +SKIP
>>> report["converted"], report["kernel"]       # doctest: +SKIP
"""
from .int_linear import IntegerLinear, RuntimeReport, integer_runtime_support, to_integer_runtime
from .kernels import (
           IntKernel,
           IntMMKernel,
           OneDNNKernel,
           available_kernels,
           get_kernel,
           int_mm,
           int_mm_matmul,
)

__all__ = ["IntKernel", "IntMMKernel", "IntegerLinear", "OneDNNKernel", "RuntimeReport", "available_kernels",
           "get_kernel", "int_mm", "int_mm_matmul", "integer_runtime_support", "to_integer_runtime"]

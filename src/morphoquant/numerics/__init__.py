"""Numerics: number formats, quantizers and bit packing (the lowest layer; imports nothing of ours)."""
from .packing import pack_codes, pack_int2, pack_int4, pack_int8, unpack_codes, unpack_int2, unpack_int4, unpack_int8
from .quantizers import (FP4_E2M1_LEVELS, NF4_LEVELS, QuantConfigError, QuantizedTensor, QuantSpec, compute_qparams,
                         dequantize, fake_quantize, observe_range, quantize, quantize_to_float, quantize_weight,
                         range_qparams)

__all__ = [
    "FP4_E2M1_LEVELS", "NF4_LEVELS", "QuantConfigError", "QuantSpec", "QuantizedTensor", "compute_qparams",
    "dequantize", "fake_quantize", "observe_range", "quantize", "quantize_to_float", "quantize_weight",
    "range_qparams",
    "pack_codes", "pack_int2", "pack_int4", "pack_int8", "unpack_codes", "unpack_int2", "unpack_int4", "unpack_int8",
]

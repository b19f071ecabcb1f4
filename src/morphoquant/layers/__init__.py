"""Quantized modules built on the numerics (imports only ``morphoquant.numerics``)."""
from .quant_linear import ActivationConfig, QuantLinear

__all__ = ["ActivationConfig", "QuantLinear"]

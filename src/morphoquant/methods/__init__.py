"""Quantization methods, one module per algorithm (each registers itself in ``METHODS``)."""
from . import awq, gptq, mbq, morpho, mquant, osplus, quarot, rtn, smoothquant  # noqa: F401  (registration)
from .base import METHODS, BlockContext, EmptyLayerError, Method, MethodOptions, get_method, register

__all__ = ["METHODS", "BlockContext", "EmptyLayerError", "Method", "MethodOptions", "get_method", "register"]

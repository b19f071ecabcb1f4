"""Observers: per-modality activation statistics of quantized layers (imports only numerics)."""
from .channel_stats import ChannelStats, ModalityStats, NonFiniteActivationError
from .collector import ActivationCollector, InputSampler
from .modality import (
    ALL,
    PAD,
    Modality,
    ModalityContextError,
    constant_modality_ids,
    current_modality_ids,
    modality_context,
    modality_ids_from_tokens,
)

__all__ = [
    "ALL",
    "PAD",
    "ActivationCollector",
    "ChannelStats",
    "InputSampler",
    "Modality",
    "ModalityContextError",
    "ModalityStats",
    "NonFiniteActivationError",
    "constant_modality_ids",
    "current_modality_ids",
    "modality_context",
    "modality_ids_from_tokens",
]

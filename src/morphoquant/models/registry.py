"""Which adapter handles a model: :func:`get_adapter`."""
from __future__ import annotations

from morphoquant.models.base import ModelAdapter, UnsupportedModelError
from morphoquant.models.causal_lm import CausalLMAdapter
from morphoquant.models.dinov2 import Dinov2Adapter
from morphoquant.models.omnimini import OmniMiniAdapter
from morphoquant.models.qwen_omni import QwenOmniAdapter, QwenOmniThinkerAdapter
from morphoquant.models.qwen_vl import QwenVLAdapter
from morphoquant.models.whisper import WhisperAdapter

#: Adapters tried in order; specific ones first, the generic causal-LM adapter last.
ADAPTERS: list[type[ModelAdapter]] = [
    OmniMiniAdapter, QwenOmniAdapter, QwenOmniThinkerAdapter, QwenVLAdapter, WhisperAdapter, Dinov2Adapter,
    CausalLMAdapter,
]


def _supported() -> list[str]:
    out: list[str] = []
    for a in ADAPTERS:
        out.extend(n for n in a.architectures if n not in out)
    return out


#: Model class names with a dedicated, tested adapter (any Llama-like ``*ForCausalLM`` works too).
SUPPORTED_ARCHITECTURES: list[str] = _supported()


def register_adapter(adapter: type[ModelAdapter], *, first: bool = True) -> None:
    """Add an adapter class (tried before the built-in ones unless ``first=False``)."""
    if adapter in ADAPTERS:
        ADAPTERS.remove(adapter)
    ADAPTERS.insert(0 if first else len(ADAPTERS) - 1, adapter)
    SUPPORTED_ARCHITECTURES[:] = _supported()


def adapter_class(model) -> type[ModelAdapter]:
    for a in ADAPTERS:
        if a.matches(model):
            return a
    raise UnsupportedModelError(model, SUPPORTED_ARCHITECTURES)


def get_adapter(model) -> ModelAdapter:
    """The adapter for ``model``; raises :class:`UnsupportedModelError` (listing what is supported)."""
    return adapter_class(model)(model)

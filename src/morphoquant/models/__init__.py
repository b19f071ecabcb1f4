"""Model adapters: a Hugging Face model as ordered :class:`~morphoquant.pipeline.stack.BlockStack` objects.

>>> adapter = get_adapter(model)            # raises UnsupportedModelError for unknown architectures
>>> for stack in adapter.stacks():          # encoder towers first, then the decoder
...     ...
>>> adapter.protected_module_names()        # lm_head, embeddings, talker, ... (never quantized)

Tiny random test models: :func:`morphoquant.models.tiny.tiny_model`.
"""
from morphoquant.models.base import (
    AdapterStack,
    AdapterWarning,
    ModelAdapter,
    UnsupportedModelError,
    is_protected,
)
from morphoquant.models.causal_lm import CausalLMAdapter
from morphoquant.models.dinov2 import Dinov2Adapter
from morphoquant.models.qwen_omni import QwenOmniAdapter, QwenOmniThinkerAdapter
from morphoquant.models.qwen_vl import QwenVLAdapter
from morphoquant.models.registry import (
    ADAPTERS,
    SUPPORTED_ARCHITECTURES,
    adapter_class,
    get_adapter,
    register_adapter,
)
from morphoquant.models.whisper import WhisperAdapter

__all__ = [
    "ADAPTERS", "SUPPORTED_ARCHITECTURES", "AdapterStack", "AdapterWarning", "CausalLMAdapter",
    "Dinov2Adapter",
    "ModelAdapter", "QwenOmniAdapter", "QwenOmniThinkerAdapter", "QwenVLAdapter", "UnsupportedModelError",
    "WhisperAdapter", "adapter_class", "get_adapter", "is_protected", "register_adapter",
]

"""Text-only decoder LLMs: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM and any Llama-like
``*ForCausalLM`` whose decoder blocks are ``model.layers`` with ``self_attn`` + ``mlp`` children."""
from __future__ import annotations

import torch
from torch import nn

from morphoquant.models.base import (
    AdapterStack,
    GroupSpec,
    ModelAdapter,
    block_list,
    check_rows,
    class_name,
    make_forward,
    protected_outside,
    resolve_groups,
)
from morphoquant.pipeline.stack import BlockStack, Sample
from morphoquant.statistics.modality import Modality, constant_modality_ids, modality_ids_from_tokens

#: Llama-style decoder block: attention in, attention out, MLP in, MLP out. Alternatives cover fused variants.
DECODER_GROUPS: GroupSpec = [
    [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.qkv_proj"]],
    [["self_attn.o_proj"], ["self_attn.dense"]],
    [["mlp.gate_proj", "mlp.up_proj"], ["mlp.gate_up_proj"], ["mlp.up_proj"], ["mlp.fc1"]],
    [["mlp.down_proj"], ["mlp.fc2"]],
]


def decoder_token_ids(sample: Sample, token_modality: dict[int, Modality],
                      hidden_shape=None, stack: str = "text") -> torch.Tensor:
    """Decoder ids from ``input_ids`` (placeholder tokens → their modality), ``attention_mask`` (→ PAD).

    Without ``input_ids`` (``inputs_embeds`` given), every row is text.
    """
    input_ids = sample.get("input_ids")
    mask = sample.get("attention_mask")
    if input_ids is not None:
        ids = modality_ids_from_tokens(input_ids.cpu(), None if mask is None else mask.cpu(), token_modality)
    else:
        emb = sample.get("inputs_embeds")
        if emb is None and hidden_shape is None:
            raise ValueError(f"stack {stack!r}: the sample has neither input_ids nor inputs_embeds")
        shape = tuple(emb.shape[:-1]) if emb is not None else tuple(hidden_shape)[:-1]
        ids = constant_modality_ids(shape, Modality.TEXT, None if mask is None else mask.cpu())
    return check_rows(ids, hidden_shape, stack)


def is_decoder_block(block: nn.Module) -> bool:
    attn = getattr(block, "self_attn", None)
    return attn is not None and getattr(block, "mlp", None) is not None and any(
        _linear_like(getattr(attn, n, None)) for n in ("q_proj", "qkv_proj"))


def _linear_like(mod) -> bool:
    """An ``nn.Linear`` or a quantized replacement of one (a reloaded quantized model must still match)."""
    return isinstance(mod, nn.Module) and isinstance(getattr(mod, "in_features", None), int) and \
        isinstance(getattr(mod, "out_features", None), int)


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``("model.layers", layers)`` for a Llama-like ``*ForCausalLM`` (or via ``get_decoder()``)."""
    candidates = []
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        candidates.append(("model", inner))
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            dec = get_decoder()
        except Exception:  # noqa: BLE001 - some models raise when there is no decoder
            dec = None
        if isinstance(dec, nn.Module):
            name = next((n for n, m in model.named_modules() if m is dec), None)
            if name is not None:
                candidates.append((name, dec))
    for name, dec in candidates:
        try:
            attr, layers = block_list(dec, ("layers",))
        except LookupError:
            continue
        if is_decoder_block(layers[0]):
            return f"{name}.{attr}" if name else attr, layers
    return None


class CausalLMAdapter(ModelAdapter):
    name = "causal-lm"
    architectures = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
    model_types = ("llama", "qwen2", "mistral")

    @classmethod
    def matches(cls, model) -> bool:
        if not isinstance(model, nn.Module):
            return False
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            return False
        known = class_name(model) in cls.architectures
        if not (known or class_name(model).endswith("ForCausalLM")):
            return False
        return find_decoder_layers(model) is not None

    def __init__(self, model):
        super().__init__(model)
        self.layers_path, self.layers = find_decoder_layers(model)

    def _build_stacks(self) -> list[BlockStack]:
        return [AdapterStack(
            name="text",
            blocks=list(self.layers),
            forward=make_forward(self.model),
            modality_ids=lambda sample, hidden_shape: decoder_token_ids(sample, {}, hidden_shape, "text"),
            default_enabled=True,
            sequential_groups=resolve_groups(self.layers[0], DECODER_GROUPS, stack_name="text"),
            ignore=[],
            modality=Modality.TEXT,
            row_layout="[B, T, H] decoder tokens",
            uses_sample=lambda sample: True,
        )]

    def decoder_modality_ids(self, sample: Sample) -> torch.Tensor:
        return decoder_token_ids(sample, {})

    def protected_module_names(self) -> list[str]:
        return protected_outside(self.model, self.stacks())

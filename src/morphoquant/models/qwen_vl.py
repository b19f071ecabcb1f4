"""Qwen2.5-VL: vision tower (fused ``attn.qkv``) + text decoder.

Row layouts (transformers 5.24): vision blocks receive ``[L, H]`` (all patches of the call, window-permuted;
images call first, then videos, as in Qwen2.5-Omni); decoder layers receive ``[B, T, H]``.
"""
from __future__ import annotations

import torch

from morphoquant.models.base import (
    AdapterStack,
    ModelAdapter,
    block_list,
    find_module,
    make_forward,
    protected_outside,
    resolve_groups,
)
from morphoquant.models.causal_lm import DECODER_GROUPS, decoder_token_ids
from morphoquant.models.qwen_omni import config_token_id, vision_tower_stack
from morphoquant.pipeline.stack import BlockStack, Sample
from morphoquant.statistics.modality import Modality


class QwenVLAdapter(ModelAdapter):
    name = "qwen2.5-vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    model_types = ("qwen2_5_vl",)

    def __init__(self, model):
        super().__init__(model)
        vision_classes = ("VisionTransformerPretrainedModel", "VisionEncoder")
        self.vision_path, self.visual = find_module(model, vision_classes)
        self.text_path, self.text_model = find_module(model, ("TextModel",), exclude=vision_classes)
        cfg = model.config
        self.token_modality: dict[int, Modality] = {}
        for modality, names in ((Modality.IMAGE, ("image_token_id", "image_token_index")),
                                (Modality.VIDEO, ("video_token_id", "video_token_index"))):
            tid = config_token_id(cfg, *names)
            if tid is None:  # some releases keep the ids on the text config only
                tid = config_token_id(getattr(cfg, "text_config", None), *names)
            if tid is not None:
                self.token_modality[tid] = modality

    def _build_stacks(self) -> list[BlockStack]:
        fwd = make_forward(self.model)
        _, vblocks = block_list(self.visual, ("blocks", "layers"))
        _, tblocks = block_list(self.text_model, ("layers",))
        return [
            vision_tower_stack(vblocks, fwd),
            AdapterStack(
                name="text", blocks=list(tblocks), forward=fwd,
                modality_ids=lambda s, h: decoder_token_ids(s, self.token_modality, h, "text"),
                default_enabled=True,
                sequential_groups=resolve_groups(tblocks[0], DECODER_GROUPS, stack_name="text"),
                row_layout="[B, T, H] decoder tokens; placeholder tokens carry image/video embeddings",
                uses_sample=lambda s: True,
            ),
        ]

    def decoder_modality_ids(self, sample: Sample) -> torch.Tensor:
        return decoder_token_ids(sample, self.token_modality)

    def protected_module_names(self) -> list[str]:
        return protected_outside(self.model, self.stacks())

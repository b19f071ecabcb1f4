"""DINOv2 ViT: one ``vision`` stack (``Dinov2Model``; also ``Dinov2ForImageClassification``'s backbone).

Row layout: ``Dinov2Layer`` receives ``[B, 1 + R + P, H]`` (CLS, R register tokens, P = (h/p)(w/p) patches);
every row is IMAGE and there is no padding.
"""
from __future__ import annotations

import torch

from morphoquant.models.base import (
    AdapterStack,
    GroupSpec,
    ModelAdapter,
    block_list,
    find_module,
    make_forward,
    protected_outside,
    resolve_groups,
    tower_ids,
)
from morphoquant.pipeline.stack import BlockStack, Sample
from morphoquant.statistics.modality import Modality

#: 5.24 renamed ``attention.attention.query/key/value`` and ``attention.output.dense`` to
#: ``attention.q_proj/k_proj/v_proj/o_proj``.
DINOV2_GROUPS: GroupSpec = [
    [["attention.q_proj", "attention.k_proj", "attention.v_proj"],
     ["attention.attention.query", "attention.attention.key", "attention.attention.value"]],
    [["attention.o_proj"], ["attention.output.dense"]],
    [["mlp.fc1"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.weights_in"]],
    [["mlp.fc2"], ["mlp.down_proj"], ["mlp.weights_out"]],
]


class Dinov2Adapter(ModelAdapter):
    name = "dinov2"
    architectures = ("Dinov2Model", "Dinov2ForImageClassification")
    model_types = ("dinov2",)

    def __init__(self, model):
        super().__init__(model)
        self.encoder_path, self.encoder = find_module(model, ("Dinov2Encoder",))

    def vision_ids(self, sample: Sample, hidden_shape=None) -> torch.Tensor:
        pix = sample.get("pixel_values")
        expected = None
        if pix is not None:
            cfg = self.model.config
            p = int(cfg.patch_size)
            registers = int(getattr(cfg, "num_register_tokens", 0) or 0)
            n_tok = 1 + registers + (pix.shape[-2] // p) * (pix.shape[-1] // p)
            expected = int(pix.shape[0]) * n_tok
            if hidden_shape is None:
                hidden_shape = (int(pix.shape[0]), n_tok, 1)
        return tower_ids(hidden_shape, Modality.IMAGE, expected, "vision")

    def _build_stacks(self) -> list[BlockStack]:
        _, blocks = block_list(self.encoder, ("layer", "layers"))
        return [AdapterStack(
            name="vision", blocks=list(blocks), forward=make_forward(self.model),
            modality_ids=self.vision_ids, default_enabled=True,
            sequential_groups=resolve_groups(blocks[0], DINOV2_GROUPS, stack_name="vision"),
            modality=Modality.IMAGE,
            row_layout="[B, 1 + registers + patches, H]; CLS first; no padding",
            uses_sample=lambda s: s.get("pixel_values") is not None,
        )]

    def decoder_modality_ids(self, sample: Sample) -> torch.Tensor:
        """DINOv2 has no decoder: the ids of its only (vision) sequence, ``[B, 1 + R + P]``."""
        return self.vision_ids(sample)

    def protected_module_names(self) -> list[str]:
        return protected_outside(self.model, self.stacks())

"""What the layer-wise pipeline needs to know about one stack of blocks.

Model adapters (a higher layer) build :class:`BlockStack` objects; the pipeline never imports an adapter.
A *sample* is a ``dict`` of model keyword arguments (``input_ids``, ``attention_mask``, ``pixel_values``,
``input_features``, ``decoder_input_ids`` ...) that one call of ``forward`` consumes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

Sample = dict[str, torch.Tensor]


@dataclass
class BlockStack:
    """A sequence of identical blocks whose linears are quantized one block at a time.

    Attributes:
        name: stack name used in recipes and logs (``text``, ``vision``, ``audio``, ``encoder``, ``decoder``).
        blocks: the blocks in execution order; block ``i+1`` consumes the first output of block ``i``.
        forward: runs the whole model on one sample (the pipeline stops it at the first block with a hook).
        modality_ids: ``(sample, hidden_shape) -> int8 tensor`` of per-token modality ids (``PAD`` = -1) whose
            number of elements equals the number of token rows of the hidden states entering the blocks.
        default_enabled: whether the stack is quantized when the recipe does not mention it (towers: False).
        sequential_groups: linear-name suffixes in the order they execute inside a block, grouped so that a
            method can quantize group ``g`` and re-run the block before calibrating group ``g+1``.
        ignore: linear-name suffixes inside a block that are never quantized.
    """

    name: str
    blocks: list[nn.Module]
    forward: Callable[[Sample], object]
    modality_ids: Callable[[Sample, torch.Size], torch.Tensor]
    default_enabled: bool = True
    sequential_groups: list[list[str]] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The quantizable ``nn.Linear`` modules of ``block``, by their name relative to the block."""
        out = {}
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear) and not any(name.endswith(s) for s in self.ignore):
                out[name] = mod
        return out

"""The interface every quantization method implements, and the method registry.

A method sees one block at a time (the layer-wise pipeline owns the loop): :meth:`Method.quantize_block`
receives the block's linears, their calibration statistics per modality (padding excluded) and, when the
method asks for them, sampled input rows with their modality ids; it returns the ``QuantLinear`` replacing each
linear. Methods that transform the whole model first (rotations, global statistics) override
:meth:`Method.prepare`. Options are a pydantic model whose fields are the recipe's ``options`` keys (unknown keys
are errors).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..layers import ActivationConfig, QuantLinear
from ..numerics import QuantSpec
from ..statistics.channel_stats import ModalityStats
from ..statistics.collector import InputSampler


class MethodOptions(BaseModel):
    """Base of every method's options (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


class EmptyLayerError(RuntimeError):
    """A layer received no calibration tokens."""


@dataclass
class BlockContext:
    """Everything a method needs to quantize the linears of one block."""

    stack: str
    index: int
    block: nn.Module
    linears: dict[str, nn.Linear]
    stats: dict[str, ModalityStats]
    weight_spec: QuantSpec
    act: ActivationConfig | None
    sampler: InputSampler | None = None
    modality_weights: dict[str, float] | None = None
    # run the block on every calibration input (optionally with extra observers) — for methods that need a
    # second look after changing something (GPTQ true-sequential, SmoothQuant re-calibration)
    rerun: Callable[..., Any] | None = None
    global_state: dict = field(default_factory=dict)
    # name -> weight quantizer ``(W, fold_scale) -> QuantizedTensor`` (GPTQ); None = round to nearest
    weight_quantizers: dict[str, Callable] = field(default_factory=dict)
    report: dict[str, dict] = field(default_factory=dict)   # per-linear figures the method wants logged
    arrays: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)   # per-linear per-channel arrays

    def weight_quantizer(self, name: str):
        return self.weight_quantizers.get(name)

    def full_name(self, name: str) -> str:
        return f"{self.stack}.{self.index}.{name}"


class Method:
    """Base class: subclasses set ``name`` and ``Options`` and implement :meth:`quantize_linear` or
    :meth:`quantize_block`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    needs_inputs: ClassVar[bool] = False        # ask the pipeline for sampled input rows
    needs_global_stats: ClassVar[bool] = False  # ask for a full-precision statistics pre-pass over all stacks

    def __init__(self, options: MethodOptions | dict | None = None):
        if options is None or isinstance(options, dict):
            options = self.Options(**(options or {}))
        self.options = options

    def prepare(self, model: nn.Module, stacks: list, global_stats: dict[str, ModalityStats] | None) -> dict:
        """Whole-model work before the block loop; returns a state dict handed to every block."""
        return {}

    def transform(self, model: nn.Module, stacks: list) -> dict:
        """A function-preserving change of the model made before any statistic is collected (the global
        pre-pass included), e.g. an online Hadamard on some inputs; returns a summary, kept in the run's state. Must be
        deterministic: a run resuming from a checkpoint calls it again. The default changes nothing."""
        return {}

    def restore(self, model: nn.Module, stacks: list, state: dict) -> None:
        """Re-apply, on a freshly loaded model, the changes :meth:`prepare` made outside the blocks (a run
        resuming from a checkpoint gets ``state`` from it and does not call :meth:`prepare`). Methods whose
        :meth:`prepare` changes the model (rotations) must override this; the default changes nothing."""

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantLinear]:
        return {name: self.quantize_linear(ctx, name, lin) for name, lin in ctx.linears.items()}

    def quantize_linear(self, ctx: BlockContext, name: str, linear: nn.Linear) -> QuantLinear:
        raise NotImplementedError

    @staticmethod
    def static_range(ctx: BlockContext, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Pooled calibrated (lo, hi) for static activation quantizers (per channel or per tensor)."""
        if ctx.act is None or ctx.act.dynamic:
            return None
        st = ctx.stats[name].all
        if ctx.act.spec.granularity == "channel":
            return st.min, st.max
        return st.min.min(), st.max.max()


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"method {cls.__name__} has no name")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None

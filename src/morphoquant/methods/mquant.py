"""MQuant-style modality-specific static activation scales (after Yu et al., ACM MM 2025).

One linear layer of a multimodal decoder sees text, image, video and audio tokens whose activation ranges differ
by orders of magnitude; a single static per-tensor scale is either too coarse for text or clips the other
modalities. MQuant keeps a **separate static per-tensor scale per modality** for the same layer: for a token
row ``x_n`` of modality ``m(n)``,

    x_q[n] = clamp(round(x_n / s_{m(n)}) + z_{m(n)}, q_min, q_max),     y_n = s_{m(n)} · W_q (x_q[n] − z_{m(n)}) + b

— a per-row scale that is *chosen* by the token's modality, not computed from the token (no per-token dynamic
range, no division by a per-token statistic that would cancel the static scale). This is a deployable integer
GEMM: the rows of one GEMM may carry different scales (applied in the epilogue, like per-token scales).
``s_m, z_m`` come from the calibration range of modality ``m`` (padding excluded), optionally shrunk by a clip
ratio chosen per modality on sampled rows of that modality (grid, activation MSE). A modality with fewer than
``min_tokens`` calibration tokens, padding rows and modalities never seen use the pooled range (index ``M``).

At run time the layer reads the per-row modality ids from :func:`modality_context` (a context variable): the
pipeline and every evaluator must wrap each forward in ``with modality_context(ids):`` with the decoder's ids
(``[B, T]``, ``PAD`` = -1). A mixed-modality layer without ids raises :class:`ModalityContextError` (never a
silent fallback). Layers of single-modality stacks (encoder towers, text-only LLMs) get an ordinary static
per-tensor ``QuantLinear``.

As in MQuant, an optional QuaRot-style rotation (``rotate``; :mod:`.quarot`) runs first on Llama/Qwen2-style
decoders (``auto``: when supported), and weights use the pipeline's quantizer (RTN, or GPTQ with
``weight_method: gptq``).
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..layers import QuantLinear
from ..numerics import fake_quantize, range_qparams
from ..statistics.modality import (
    Modality,
    ModalityContextError,
    current_modality_ids,
    modality_context,
    row_modality_index,
)
from .base import BlockContext, Method, MethodOptions, register
from .quarot import (
    HadamardLinear,
    HadamardQuantLinear,
    UnsupportedRotationError,
    quantize_online,
    rotate_model,
)

log = logging.getLogger("morphoquant")

__all__ = [
    "HadamardModalityScaledQuantLinear",
    "MQuant",
    "MQuantOptions",
    "ModalityContextError",
    "ModalityScaledQuantLinear",
    "current_modality_ids",
    "modality_context",
]

N_MODALITIES = len(Modality)
POOLED = N_MODALITIES        # index of the pooled (fallback) scale


class ModalityScaledQuantLinear(QuantLinear):
    """``QuantLinear`` with one static per-tensor activation quantizer per modality.

    ``act_scale``/``act_zero`` have ``M + 1`` entries: one per :class:`Modality` id, then the pooled fallback
    (padding, unseen modalities)."""

    def __init__(self, in_features, out_features, weight_spec, act, bias, dabc="none"):
        super().__init__(in_features, out_features, weight_spec, act, bias, dabc)
        if act is not None and (act.dynamic or act.spec.granularity != "tensor"):
            raise ValueError("modality-specific scales are static per-tensor activation quantizers")
        self.act_scale = torch.ones(N_MODALITIES + 1)
        self.act_zero = torch.zeros(N_MODALITIES + 1)

    def set_modality_ranges(self, ranges: dict[int, tuple[torch.Tensor, torch.Tensor]],
                            pooled: tuple[torch.Tensor, torch.Tensor]) -> None:
        """``ranges[m] = (lo, hi)`` per modality id; missing ids use ``pooled``."""
        scale, zero = torch.empty(N_MODALITIES + 1), torch.empty(N_MODALITIES + 1)
        for i in range(N_MODALITIES + 1):
            lo, hi = ranges.get(i, pooled)
            s, z = range_qparams(lo, hi, self.act.spec)
            scale[i], zero[i] = s.reshape(()), z.reshape(())
        self.act_scale, self.act_zero = scale, zero

    @property
    def modality_dependent(self) -> bool:
        return True

    def row_index(self, n_rows: int) -> torch.Tensor:
        return row_modality_index(n_rows, POOLED).to(self.act_scale.device)

    def quantize_input(self, x: torch.Tensor, need_resid: bool = True, **kwargs):
        """Codes with the row's modality scale; the row scale/zero point go to the GEMM epilogue like
        per-token ones (``QuantLinear.quantize_input`` contract; residual of the DABC columns if asked)."""
        spec = self.act.spec
        idx = self.row_index(x.shape[0])
        s = self.act_scale[idx].reshape(-1, 1)
        z = self.act_zero[idx].reshape(-1, 1)
        x_q = torch.clamp(torch.round(x / s) + z, spec.qmin, spec.qmax)
        cols = self.outlier_idx
        resid = (x[:, cols] - s * (x_q[:, cols] - z)) if need_resid else None
        return x_q, (z if not spec.symmetric else None), s, resid

    def extra_repr(self) -> str:
        return super().extra_repr() + ", per-modality scales"


class HadamardModalityScaledQuantLinear(HadamardQuantLinear, ModalityScaledQuantLinear):
    """Online Hadamard (down_proj of a rotated model) + modality-specific static scales."""


# ------------------------------------------------------------------------------------------------ method

class MQuantOptions(MethodOptions):
    rotate: Literal["auto", "always", "never"] = "auto"
    """QuaRot-style rotation before quantization: auto = when the decoder supports it."""
    seed: int = 0
    online_down_proj: bool = True
    clip_search: bool = True
    """Per-modality clip ratio of the static range (activation MSE on sampled rows of that modality)."""
    clip_grid: int = Field(20, ge=1)
    clip_min: float = Field(0.5, gt=0, le=1)
    min_tokens: int = Field(16, ge=1)
    """A modality with fewer calibration tokens in a layer uses the pooled range."""


def _clip_ratio(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, act, grid: int, low: float) -> float:
    if x is None or x.numel() == 0 or grid == 1:
        return 1.0
    best, best_r = float("inf"), 1.0
    for r in torch.linspace(1.0, low, grid).tolist():
        s, z = range_qparams(lo * r, hi * r, act.spec)
        err = float((fake_quantize(x, act.spec, "activation", scale=s, zero_point=z) - x).pow(2).mean())
        if err < best:
            best, best_r = err, r
    return best_r


@register
class MQuant(Method):
    name = "mquant"
    Options = MQuantOptions
    needs_inputs = True

    def prepare(self, model, stacks, global_stats) -> dict:
        o = self.options
        state: dict = {"mixed_stacks": [s.name for s in stacks if getattr(s, "modality", None) is None]}
        if o.rotate != "never":
            try:
                state["rotation"] = rotate_model(model, stacks, o.seed, o.online_down_proj)
            except UnsupportedRotationError as e:
                if o.rotate == "always":
                    raise
                log.warning("mquant: no rotation (%s)", e)
                state["rotation"] = None
        return state

    def restore(self, model, stacks, state) -> None:
        if state.get("rotation") is not None:    # deterministic: the same seed gives the same rotation
            rotate_model(model, stacks, self.options.seed, self.options.online_down_proj)

    def quantize_linear(self, ctx: BlockContext, name: str, linear: nn.Linear) -> QuantLinear:
        o = self.options
        act = ctx.act
        online = isinstance(linear, HadamardLinear)
        wq = ctx.weight_quantizer(name)
        if act is None:
            cls = HadamardQuantLinear if online else QuantLinear
            return quantize_online(linear, cls, ctx.weight_spec, None, weight_quantizer=wq) if online else \
                cls.from_linear(linear, ctx.weight_spec, None, weight_quantizer=wq)
        if act.dynamic or act.spec.granularity != "tensor":
            raise ValueError("mquant uses static per-tensor activation scales per modality: set "
                             "activations: {granularity: tensor} (dynamic: false)")
        stats = ctx.stats[name]
        x_all = ctx.sampler.rows(name) if (o.clip_search and ctx.sampler is not None) else None
        ids = ctx.sampler.ids(name).long() if x_all is not None else None
        lo, hi = stats.all.min.min(), stats.all.max.max()
        r = _clip_ratio(x_all, lo, hi, act, o.clip_grid, o.clip_min) if o.clip_search else 1.0
        pooled = (lo * r, hi * r)
        ranges: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        report: dict = {"pooled_clip": r}
        for m in Modality:
            if m.label not in stats.by_modality or stats[m.label].count < o.min_tokens:
                continue
            st = stats[m.label]
            lo_m, hi_m = st.min.min(), st.max.max()
            xm = x_all[ids == int(m)] if x_all is not None else None
            rm = _clip_ratio(xm, lo_m, hi_m, act, o.clip_grid, o.clip_min) if o.clip_search else 1.0
            ranges[int(m)] = (lo_m * rm, hi_m * rm)
            report[f"range_{m.label}"] = [float(lo_m * rm), float(hi_m * rm)]
        mixed = ctx.stack in ctx.global_state.get("mixed_stacks", []) and len(ranges) > 1
        report["modality_scales"] = mixed
        ctx.report.setdefault(name, {}).update(report)
        if not mixed:
            rng = next(iter(ranges.values())) if len(ranges) == 1 else pooled
            if online:
                return quantize_online(linear, HadamardQuantLinear, ctx.weight_spec, act, act_range=rng,
                                       weight_quantizer=wq)
            return QuantLinear.from_linear(linear, ctx.weight_spec, act, act_range=rng, weight_quantizer=wq)
        cls = HadamardModalityScaledQuantLinear if online else ModalityScaledQuantLinear
        q = quantize_online(linear, cls, ctx.weight_spec, act, act_range=pooled, weight_quantizer=wq) if online \
            else cls.from_linear(linear, ctx.weight_spec, act, act_range=pooled, weight_quantizer=wq)
        q.set_modality_ranges(ranges, pooled)
        return q

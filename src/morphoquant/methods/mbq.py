"""MBQ-style modality-balanced scale search (after Li et al., "MBQ: Modality-Balanced Quantization", CVPR 2025).

Same machinery as SmoothQuant/AWQ (:mod:`.channel_scaling`: per input-sharing group, fold ``1/s`` into the
norm / v_proj / up_proj), but the scale is *searched* with an objective that (1) quantizes activations as the
recipe will (per-token dynamic, static per-tensor or per-channel — the same numerics as the final layer) and
(2) balances modalities:

    s(α) = max|X_c|^α / max|W_c|^(1−α)          (``scale_form: smooth``, W4A8/W4A4)
    s(α) = ā^α / sqrt(max ā^α · min ā^α)        (``scale_form: awq``, ā = mean|x|; W4A16)

    L(α) = Σ_m w_m · L_m(α),   L_m(α) = mean_{n ∈ m} Σ_k ‖ Q_a(x_n / s) · Q_w(W_k diag(s))ᵀ − W_k x_n ‖² / O_k

over the modalities ``m`` present in the sampled rows (padding never sampled). ``s = 1`` is always a candidate,
so the search never makes its objective worse than plain RTN.

Modality weights ``w_m``: ``balanced`` (default; every present modality weighs the same, whatever its token
count), ``pooled`` (by token count, i.e. plain MSE) or an explicit ``{modality: weight}`` map. The paper derives
``w_m`` from the gradient of the task loss w.r.t. each modality's tokens (sensitivity); that needs a backward
pass through the whole model, which a layer-wise pipeline does not run — **not implemented**; a user with
measured sensitivities passes them as the explicit map. Losses are per linear output (the paper reconstructs the
block output); the per-modality losses before/after are in the layer report.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from ..statistics import Modality
from .awq import awq_scales
from .base import BlockContext, register
from .channel_scaling import (
    ChannelScalingMethod,
    FoldGroup,
    GroupData,
    ScalingOptions,
    modality_weights,
    per_modality_mse,
    simulate_linear,
    static_range_of,
    transform_stats,
)
from .smoothquant import smooth_scales


class MBQOptions(ScalingOptions):
    grid: int = Field(20, ge=1)
    """Number of α steps in [0, 1]."""
    scale_form: Literal["auto", "smooth", "awq"] = "auto"
    """auto: ``smooth`` when activations are quantized, ``awq`` for weight-only recipes."""
    modality_weighting: Literal["balanced", "pooled"] | dict[str, float] = "balanced"

    @field_validator("modality_weighting")
    @classmethod
    def _known(cls, v):
        if isinstance(v, dict):
            bad = set(v) - {m.label for m in Modality}
            if bad:
                raise ValueError(f"unknown modalities {sorted(bad)} in modality_weighting")
        return v


@register
class MBQ(ChannelScalingMethod):
    name = "mbq"
    Options = MBQOptions
    needs_inputs = True

    def choose(self, ctx: BlockContext, g: FoldGroup, data: GroupData):
        o = self.options
        form = o.scale_form if o.scale_form != "auto" else ("awq" if ctx.act is None else "smooth")
        row_w = modality_weights(data.ids, data.x.shape[0], o.modality_weighting)
        weight_only = ctx.act is None
        if form == "smooth":
            a = g.reduce(data.stats.all.absmax, "amax")
            w = g.reduce(torch.stack([x.abs().amax(0) for x in data.all_weights.values()]).amax(0), "amax")
            cands = [(i / o.grid, smooth_scales(a, w, i / o.grid)) for i in range(o.grid + 1)]
        else:
            m = g.reduce(data.stats.all.mean_abs, "mean")
            cands = [(i / o.grid, awq_scales(m, i / o.grid)) for i in range(o.grid + 1)]
        identity = self.search_loss(ctx, g, data, None, None, row_w, weight_only)
        best, best_alpha, best_s = identity, None, None
        for alpha, s in cands:
            loss = self.search_loss(ctx, g, data, s, None, row_w, weight_only)
            if loss < best:
                best, best_alpha, best_s = loss, alpha, s
        info = {"scale_form": form, "alpha": best_alpha, "loss": best, "loss_identity": identity,
                "loss_by_modality": self._by_modality(ctx, g, data, best_s)}
        return best_s, None, info

    def _by_modality(self, ctx, g, data, s_p) -> dict:
        s_c = torch.ones(data.x.shape[1]) if s_p is None else g.expand(s_p)
        st = static_range_of(ctx, transform_stats(data.stats, s_c, None)) if ctx.act is not None else None
        out: dict[str, float] = {}
        for name in g.quantized:
            lin = ctx.block.get_submodule(name)
            y = simulate_linear(lin, data.weights[name] * s_c, data.x / s_c, ctx.weight_spec, ctx.act, st)
            for k, v in per_modality_mse(y, data.y_fp[name], data.ids).items():
                out[k] = out.get(k, 0.0) + v
        return out

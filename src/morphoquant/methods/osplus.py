"""Outlier Suppression+ style channel-wise shift and scale (after Wei et al., EMNLP 2023).

Activation channels are often asymmetric (shifted) and of very different widths. OS+ re-centres and rescales
each input channel,

    z_c = (max_c + min_c) / 2,        x̃ = (x − z) / s,        y = (W · diag(s)) x̃ + (b + W z),

so ``x̃_c`` is centred on 0 (half-range ``h_c = (max_c − min_c)/2``) and the scaled channels fit one
activation range. The scale follows OS+: for a threshold ``t``, ``s_c = max(1, h_c / t)`` (only channels wider
than ``t`` are shrunk, their width migrates into the weights); ``t`` is searched over ``grid`` quantiles of the
channel half-ranges (the largest = no scaling), minimising the output error of the fully quantized consumers
(activation quantizer of the recipe + RTN weights) on sampled rows, pooled over modalities.

Where the transform goes (:mod:`.channel_scaling`):

* scale: into the producing norm weight (``γ/s``), v_proj rows (o_proj) or up_proj rows (down_proj);
* shift: into the producing LayerNorm bias (``β ← (β − z)/s``; Whisper, DINOv2, audio towers) or the v_proj bias
  (o_proj: attention weights sum to 1). RMSNorm has no bias and up_proj→down_proj is multiplicative, so for
  Llama/Qwen2 q/k/v, gate/up and down_proj the shift is **explicit** (``explicit: true``, the default): a
  per-channel subtraction before quantization (``InputTransformQuantLinear``; in deployment a bias in the norm
  kernel); ``explicit: false`` keeps only the foldable parts.
* the output bias term ``W z`` is computed with the *quantized* weight, ``b' = b + Ŵ'·(z/s)``, so the quantized
  layer is exactly ``Ŵ'(Q(x̃) + z/s) + b`` (a layer with no bias gains one: exporters must keep it).
"""
from __future__ import annotations

import torch
from pydantic import Field

from .base import BlockContext, register
from .channel_scaling import ChannelScalingMethod, FoldGroup, GroupData, ScalingOptions, modality_weights


class OSPlusOptions(ScalingOptions):
    explicit: bool = True
    grid: int = Field(20, ge=1)
    """Number of threshold candidates (quantiles of the channel half-ranges)."""
    shift: bool = True
    """Centre the channels (z = (max + min)/2); false = scale only."""


@register
class OSPlus(ChannelScalingMethod):
    name = "osplus"
    Options = OSPlusOptions
    needs_inputs = True
    uses_shift = True

    def choose(self, ctx: BlockContext, g: FoldGroup, data: GroupData):
        o = self.options
        _, can_shift = g.feasible(o.explicit)
        st = data.stats.all
        lo = g.reduce(st.min, "amin")
        hi = g.reduce(st.max, "amax")
        z = (hi + lo) / 2 if (o.shift and can_shift) else None
        half = (hi - lo) / 2 if z is not None else torch.maximum(hi.abs(), lo.abs())
        half = half.clamp(min=1e-8)
        row_w = modality_weights(data.ids, data.x.shape[0], "pooled")
        weight_only = ctx.act is None
        qs = torch.linspace(0, 1, o.grid) if o.grid > 1 else torch.ones(1)
        thresholds = torch.quantile(half.double(), qs.double()).float().unique()
        best, best_t, best_s = float("inf"), None, None
        for t in thresholds.tolist():
            s = torch.clamp(half / max(t, 1e-8), min=1.0)
            loss = self.search_loss(ctx, g, data, s, z, row_w, weight_only)
            if loss < best:
                best, best_t, best_s = loss, t, s
        no_shift = self.search_loss(ctx, g, data, None, None, row_w, weight_only)
        info = {"threshold": best_t, "loss": best, "loss_identity": no_shift,
                "scaled_channels": int((best_s > 1).sum())}
        if no_shift <= best:       # the migration does not pay on this group: leave it alone
            return None, None, {**info, "transform": "identity (no candidate beat it)"}
        return best_s, z, info

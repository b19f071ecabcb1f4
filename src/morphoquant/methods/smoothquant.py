"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights with a per-channel scale.

For the linears ``W_k`` that share an input ``X`` (q/k/v; gate/up; o_proj; down_proj), per input channel ``c``

    s_c = max_n |X_{n,c}|^α / max_{k,o} |W_k[o, c]|^(1−α),        X ← X / s,  W_k ← W_k · diag(s)

(``α`` = migration strength; channels whose activation or weight column is all zero keep ``s_c = 1``; ``s`` is
clamped to [1e-5, 1e5]). The product ``X Wᵀ`` is unchanged; the activation range per channel flattens, which
helps per-token and per-tensor activation quantizers. ``max|X_c|`` comes from the calibration statistics of the
block (all modalities pooled, padding excluded).

Where ``1/s`` goes (see :mod:`.channel_scaling`): into the preceding RMSNorm/LayerNorm weight for q/k/v and
gate/up (Llama/Qwen2: ``input_layernorm`` / ``post_attention_layernorm``; Whisper, Omni audio, DINOv2 and vision
towers by tracing), into the ``v_proj`` rows for ``o_proj`` (GQA-aware: one scale per value channel) and into
the ``up_proj`` rows for ``down_proj``. Nothing is left at run time by default; ``explicit: true`` applies the
scale at run time where no producer can absorb it (sequential mode's o_proj/down_proj, GELU MLPs' fc2),
otherwise those inputs are left unsmoothed and the layer report says so. Then round-to-nearest activations at
the recipe's granularity, and the pipeline's weight quantizer (RTN or GPTQ with the Hessian re-expressed for
``X/s``).
"""
from __future__ import annotations

import torch
from pydantic import Field

from .base import BlockContext, register
from .channel_scaling import ChannelScalingMethod, FoldGroup, GroupData, ScalingOptions


class SmoothQuantOptions(ScalingOptions):
    alpha: float = Field(0.5, ge=0, le=1)
    """Migration strength: α = 1 moves all range into the weights (s = max|X|), α = 0 none of the activation's
    (s = 1/max|W|); SmoothQuant uses 0.5 (0.8–0.85 for Llama-family models)."""


def smooth_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = a^α / w^(1−α)`` per channel; 1 where either is zero; clamped to [1e-5, 1e5]."""
    a, w = act_absmax.float(), w_absmax.float()
    ok = (a > 0) & (w > 0)
    s = torch.where(ok, a.clamp(min=1e-30).pow(alpha) / w.clamp(min=1e-30).pow(1 - alpha), torch.ones_like(a))
    return s.clamp(1e-5, 1e5)


@register
class SmoothQuant(ChannelScalingMethod):
    name = "smoothquant"
    Options = SmoothQuantOptions

    def choose(self, ctx: BlockContext, g: FoldGroup, data: GroupData):
        a = g.reduce(data.stats.all.absmax, "amax")
        w = torch.stack([x.abs().amax(0) for x in data.all_weights.values()]).amax(0)
        w = g.reduce(w, "amax")
        s = smooth_scales(a, w, self.options.alpha)
        return s, None, {"alpha": self.options.alpha}

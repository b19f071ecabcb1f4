"""Round-to-nearest: the floor every other method is compared with.

Weights: ``W_q = clamp(round(W / s_w))`` with ``s_w = max|W| / q_max`` per output channel, per group or per
tensor (min/max for asymmetric). Activations: dynamic per token (scale from each token's own range at run
time), or static per tensor / per input channel from the calibration min/max pooled over every modality
(padding excluded); per-channel static scales are folded into the weights before they are quantized.
"""
from __future__ import annotations

from torch import nn

from ..layers import QuantLinear
from .base import BlockContext, Method, MethodOptions, register


class RTNOptions(MethodOptions):
    clip_ratio: float = 1.0
    """Shrinks the static activation range (1.0 = plain min/max)."""


@register
class RTN(Method):
    name = "rtn"
    Options = RTNOptions

    def quantize_linear(self, ctx: BlockContext, name: str, linear: nn.Linear) -> QuantLinear:
        rng = self.static_range(ctx, name)
        if rng is not None and self.options.clip_ratio != 1.0:
            rng = (rng[0] * self.options.clip_ratio, rng[1] * self.options.clip_ratio)
        return QuantLinear.from_linear(linear, ctx.weight_spec, ctx.act, act_range=rng,
                                       weight_quantizer=ctx.weight_quantizer(name))

"""AWQ (Lin et al., 2024): activation-aware weight scaling, searched per input-sharing group (W4A16).

Salient weight channels are those that multiply large activations. Scaling input channel ``c`` of the weights up
by ``s_c`` (and the activation down by ``s_c``) shrinks the *relative* rounding error of that channel. For every
group of linears sharing an input (q/k/v; gate/up; o_proj via v_proj; down_proj via up_proj) AWQ searches

    s(α) = ā^α / sqrt(max_c ā_c^α · min_c ā_c^α),      ā_c = mean_n |x_{n,c}|,      α ∈ {0, 1/G, …, 1}

(the normalisation centres the scales around 1) and keeps the ``α`` minimising the output error of the
quantized weights on sampled calibration rows,

    L(α) = Σ_k mean_n ‖ Q(W_k · diag(s)) (x_n / s) − W_k x_n ‖²        (weights only: A16; ``Q`` = RTN),

then folds ``1/s`` into the producer (norm weight, v_proj/up_proj rows; :mod:`.channel_scaling`). ``α = 0`` is
the identity, so the search never does worse than RTN on its own objective. With flat activations
(``ā_c`` constant) every candidate is ``s = 1``.

**Clip search** (``clip: true``, AWQ's second step, RTN weights only): per output row and weight group a
shrink ratio ``r`` of the weight range is chosen from a grid to minimise ``‖X_g (w_g − Q_r(w_g))ᵀ‖²`` on the
sampled rows; skipped for q/k projections (as in AWQ: their error is amplified by the attention softmax).
Under ``weight_method: gptq`` the GPTQ quantizer is used instead of the clip search.

Activation quantization, when the recipe asks for it, is applied afterwards (RTN at the recipe's granularity)
but plays no part in the search (AWQ is a weight-only method; use ``mbq`` for an activation-aware search).
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..numerics import QuantSpec, quantize_weight
from ..numerics.quantizers import _group_view
from .base import BlockContext, register
from .channel_scaling import ChannelScalingMethod, ConsumerTransform, FoldGroup, GroupData, ScalingOptions


class AWQOptions(ScalingOptions):
    grid: int = Field(20, ge=1)
    """Number of α steps in [0, 1] (α = i / grid)."""
    clip: bool = True
    """Search a per-group weight clip ratio after scaling (RTN weights only)."""
    clip_grid: int = Field(20, ge=1)
    clip_min: float = Field(0.5, gt=0, le=1)
    clip_skip: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj"])
    """Linear-name suffixes excluded from the clip search."""


def awq_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``ā^α`` normalised by ``sqrt(max·min)`` (exactly 1 when ``ā`` is constant)."""
    a = mean_abs.float().clamp(min=1e-4).pow(alpha)
    if bool(a.max() == a.min()):
        return torch.ones_like(a)
    return a / (a.max() * a.min()).sqrt()


def clip_search(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, grid: int, low: float) -> torch.Tensor:
    """Per (row, group) clip ratio minimising ``‖X_g (w_g − Q_r(w_g))ᵀ‖²``; shape like the weight scales."""
    ratios = torch.linspace(1.0, low, grid)
    if spec.granularity == "group":
        g = spec.group_size
        xg, _ = _group_view(x.float(), g)                    # [N, G, g]
        best = torch.full((w.shape[0], xg.shape[1]), float("inf"))
        choice = torch.ones_like(best)
        for r in ratios.tolist():
            qt = quantize_weight(w, spec, r)
            err, _ = _group_view(w - qt.dequantize(), g)      # [O, G, g]
            e = torch.einsum("ngk,ogk->nog", xg, err).pow(2).sum(0)
            better = e < best
            best = torch.where(better, e, best)
            choice = torch.where(better, torch.full_like(choice, r), choice)
        return choice.unsqueeze(-1)
    shape = (w.shape[0], 1) if spec.granularity == "channel" else (1, 1)
    best = torch.full(shape, float("inf"))
    choice = torch.ones(shape)
    for r in ratios.tolist():
        qt = quantize_weight(w, spec, r)
        e = (x.float() @ (w - qt.dequantize()).T).pow(2).sum(0).reshape(-1, 1)
        if spec.granularity == "tensor":
            e = e.sum().reshape(1, 1)
        better = e < best
        best = torch.where(better, e, best)
        choice = torch.where(better, torch.full_like(choice, r), choice)
    return choice


@register
class AWQ(ChannelScalingMethod):
    name = "awq"
    Options = AWQOptions
    needs_inputs = True

    def choose(self, ctx: BlockContext, g: FoldGroup, data: GroupData):
        o = self.options
        mean_abs = g.reduce(data.stats.all.mean_abs, "mean")
        row_w = torch.full((data.x.shape[0],), 1.0 / data.x.shape[0])
        best, best_alpha, best_s = float("inf"), 0.0, None
        losses = []
        for i in range(o.grid + 1):
            alpha = i / o.grid
            s = awq_scales(mean_abs, alpha)
            loss = self.search_loss(ctx, g, data, s, None, row_w, weight_only=True)
            losses.append(loss)
            if loss < best:
                best, best_alpha, best_s = loss, alpha, s
        return best_s, None, {"alpha": best_alpha, "loss": best, "loss_identity": losses[0]}

    def weight_quantizer_for(self, ctx: BlockContext, name: str, t: ConsumerTransform | None, data: GroupData):
        o = self.options
        if not o.clip or ctx.weight_quantizer(name) is not None or data is None or data.x is None:
            return None
        if any(name.endswith(sfx) for sfx in o.clip_skip) or ctx.weight_spec.fmt != "int":
            return None
        x = data.x
        spec = ctx.weight_spec

        def quantizer(w, fold, perm=None):   # fold relates the folded weight's input to x: x / fold
            xs = x if perm is None else x[:, perm]          # w and fold come in the layer's stored order
            xs = xs if fold is None else xs / fold.reshape(1, -1)
            r = clip_search(w, xs, spec, o.clip_grid, o.clip_min)
            ctx.report.setdefault(name, {})["clip_mean"] = float(r.mean())
            return quantize_weight(w, spec, r)
        return quantizer


__all__ = ["AWQ", "AWQOptions", "awq_scales", "clip_search"]

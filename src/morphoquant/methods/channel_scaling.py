"""Per-input-channel scale and shift migration, shared by SmoothQuant, AWQ, MBQ-style and OS+-style methods.

For a linear ``y = W x + b`` with input channels ``c``, a positive scale ``s_c`` and a shift ``z_c`` re-express
the same function on a better-conditioned input ``x̃ = (x − z) / s``:

    y = (W · diag(s)) x̃ + (b + W z)                                                             (exact)

The methods differ only in how they choose ``s`` (and ``z``); this module finds **where** ``x ↦ x̃`` can be
absorbed for free and applies it:

* **norm → linears**: a LayerNorm/RMSNorm whose output feeds the linears directly (``input_layernorm`` → q/k/v,
  ``post_attention_layernorm`` → gate/up, Whisper ``self_attn_layer_norm`` → q/k/v, ``final_layer_norm`` → fc1,
  ...) absorbs ``1/s`` in its weight (``γ ← γ / s``, ``β ← (β − z) / s``); a shift needs a norm bias (LayerNorm),
  RMSNorm has none;
* **v_proj → o_proj / out_proj**: the attention output is ``Σ_t a_t v_t`` with ``Σ_t a_t = 1``, so scaling row
  ``r`` of ``v_proj`` (and its bias) by ``1/s_r`` scales the o_proj input channels fed by that value channel; a
  shift goes into the v_proj bias (``b_v ← (b_v − z)/s``) when it has one. With grouped-query attention,
  o_proj channel ``h·d_h + i`` reads value channel ``⌊h / n_rep⌋·d_h + i``, so ``s`` is shared by the query
  heads of one key/value head (statistics are reduced over them: max of maxima, mean of means);
* **up_proj → down_proj**: ``down(act(gate(x)) ⊙ up(x))``: scaling row ``r`` of ``up_proj`` scales input ``r`` of
  ``down_proj`` (no shift: the product is multiplicative).

Norm consumers are found by **tracing** one calibration sample through the block: a linear consumes a norm when
its input *is* the tensor that norm returned; a norm is used only if a numerical check shows that scaling its
weight (and bias) scales its output. Where nothing absorbs the transform, ``explicit`` inserts it at run time
(:class:`InputTransformQuantLinear`: ``x̃ = (x − z)/s`` before quantization — a per-channel multiply-add that a
deployment fuses into the producer kernel, not free); otherwise that input is left as it is (reported).

After the transform the block is run again on the traced sample and must reproduce its full-precision output
(relative error < ``verify_tol``): a wrong fold is an error, never a silent accuracy loss.

**Statistics** of ``x̃`` are derived exactly from those of ``x`` (min/max, sums; ``Σ|x̃|`` and the 3rd/4th power
sums only when ``z = 0``), sampled rows are transformed, and GPTQ's Hessian of ``x`` is re-expressed through the
pipeline's weight-quantizer fold hook (``H ↦ diag(1/s) H diag(1/s)``). With a shift, the bias is computed from the
*quantized* weight, ``b' = b + Ŵ'·(z/s)``, so that ``y_q = Ŵ' Q(x̃) + b'`` and the weight error acts on ``x/s``
(exactly the Hessian GPTQ sees).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..layers import QuantLinear
from ..numerics import QuantSpec, quantize_weight
from ..statistics.channel_stats import ChannelStats, ModalityStats
from ..statistics.modality import PAD, Modality
from .base import BlockContext, Method, MethodOptions

__all__ = ["BlockPlan", "ChannelScalingMethod", "ConsumerTransform", "FoldGroup", "FoldVerificationError",
           "GroupData", "InputTransformQuantLinear", "ScalingOptions", "apply_group", "is_norm",
           "make_quant_linear", "modality_weights", "plan_block", "simulate_linear", "transform_stats",
           "verify_block", "weighted_mse"]

Kind = Literal["norm", "linear", "none"]

#: producer linear → consumer linear (sibling leaf names under one parent module), see module docstring;
#: the flag says whether a shift can go into the producer's bias
LINEAR_PRODUCERS: list[tuple[str, tuple[str, ...], bool]] = [
    ("v_proj", ("o_proj", "out_proj"), True),      # attention output = convex combination of values
    ("up_proj", ("down_proj",), False),            # gated MLP: down(act(gate(x)) * up(x)); scale only
]


class FoldVerificationError(RuntimeError):
    """The transformed block no longer computes its full-precision output."""


def is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    w = getattr(module, "weight", None)
    return (isinstance(module, nn.LayerNorm) or name.endswith(("RMSNorm", "LayerNorm"))) and \
        isinstance(w, torch.Tensor) and w.dim() == 1


def _norm_foldable(norm: nn.Module, shift: bool) -> bool:
    """Does ``γ ← γ/s`` (``β ← (β − z)/s``) really turn ``norm(x)`` into ``(norm(x) − z)/s``? (numerical check)"""
    import copy
    c = norm.weight.shape[0]
    if shift and not isinstance(getattr(norm, "bias", None), torch.Tensor):
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, c, generator=gen)
    s = torch.rand(c, generator=gen) + 0.5
    z = torch.randn(c, generator=gen) if shift else torch.zeros(c)
    try:
        probe = copy.deepcopy(norm).float()
        with torch.no_grad():
            y = probe(x)
            probe.weight.div_(s)
            b = getattr(probe, "bias", None)
            if isinstance(b, torch.Tensor):
                b.sub_(z).div_(s)
            y2 = probe(x)
    except Exception:   # noqa: BLE001 — an exotic norm we cannot probe is not foldable
        return False
    return bool(torch.allclose(y2, (y - z) / s, rtol=1e-4, atol=1e-5))


@dataclass
class FoldGroup:
    """Linears of one block that read the same input, and what produces that input.

    ``index`` maps a consumer input channel to the producer channel it comes from (``None`` = identity);
    scales and shifts are chosen per *producer* channel (``n_producer`` of them) and expanded to consumers.
    """

    kind: Kind
    producer: str | None
    consumers: list[str]
    quantized: list[str]                 # consumers that this ctx quantizes
    n_producer: int
    index: torch.Tensor | None = None
    shift_foldable: bool = False
    complete: bool = True                # every consumer is quantized by this ctx (explicit transforms allowed)

    def expand(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.index is None else v[self.index]

    def reduce(self, v: torch.Tensor, how: Literal["amax", "amin", "mean"] = "amax") -> torch.Tensor:
        """Consumer-channel vector → producer channels (max / min / mean over the channels one producer feeds)."""
        if self.index is None:
            return v
        out = torch.zeros(self.n_producer, dtype=v.dtype)
        red = {"amax": "amax", "amin": "amin", "mean": "mean"}[how]
        return out.scatter_reduce(0, self.index, v, reduce=red, include_self=False)

    def feasible(self, explicit: bool) -> tuple[bool, bool]:
        """(scale possible, shift possible) for this group."""
        expl = explicit and self.complete
        scale = self.kind in ("norm", "linear") or expl
        shift = (self.kind != "none" and self.shift_foldable and self.complete) or expl
        return scale, shift

    @property
    def label(self) -> str:
        return f"{self.producer or '<input>'} -> {', '.join(self.consumers)}"


@dataclass
class BlockPlan:
    groups: list[FoldGroup]
    reference: torch.Tensor | None            # block output on the traced sample (full precision)


@dataclass
class ConsumerTransform:
    """``x̃ = (x − shift) / scale`` as seen by one consumer; ``explicit_*`` is the part applied at run time."""

    scale: torch.Tensor
    shift: torch.Tensor | None
    explicit_scale: torch.Tensor | None = None
    explicit_shift: torch.Tensor | None = None
    orig_bias: torch.Tensor | None = None
    hooks: list = field(default_factory=list)

    @property
    def explicit(self) -> bool:
        return self.explicit_scale is not None or self.explicit_shift is not None


# ------------------------------------------------------------------------------------------------ tracing

class _Stop(Exception):
    pass


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def run_one_sample(ctx: BlockContext, extra_hooks=()) -> torch.Tensor:
    """The block's output on the first calibration sample (only that one is run)."""
    if ctx.rerun is None:
        raise RuntimeError("channel scaling needs ctx.rerun (run the method inside the layer-wise pipeline)")
    box: dict = {}

    def stop(module, args, out):
        box["out"] = _first(out).detach().clone()
        raise _Stop

    handle = ctx.block.register_forward_hook(stop)
    try:
        ctx.rerun(list(extra_hooks))
    except _Stop:
        pass
    finally:
        handle.remove()
    if "out" not in box:
        raise RuntimeError("the block was never run on a calibration sample")
    return box["out"]


def plan_block(ctx: BlockContext, shift: bool = False) -> BlockPlan:
    """Trace one sample through ``ctx.block`` and group its linears by shared input and producer."""
    block = ctx.block
    norms = {n: m for n, m in block.named_modules() if n and is_norm(m)}
    lins = {n: m for n, m in block.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    inputs: dict[int, tuple[torch.Tensor, list[str]]] = {}
    handles = []

    def norm_hook(name):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                produced[id(out)] = (name, out)
        return hook

    def lin_hook(name):
        def hook(module, args):
            x = args[0]
            rec = inputs.get(id(x))
            if rec is not None and rec[0] is x:
                if name not in rec[1]:
                    rec[1].append(name)
            else:
                inputs[id(x)] = (x, [name])
        return hook

    for n, m in norms.items():
        handles.append(m.register_forward_hook(norm_hook(n)))
    for n, m in lins.items():
        handles.append(m.register_forward_pre_hook(lin_hook(n)))
    try:
        reference = run_one_sample(ctx)
    finally:
        for h in handles:
            h.remove()

    order = {n: i for i, n in enumerate(lins)}
    groups: list[FoldGroup] = []
    covered: set[str] = set()
    wanted = set(ctx.linears)
    # linear producers first (their transform rescales producer rows, which later searches must see)
    for prod, cons_leaves, shift_ok in LINEAR_PRODUCERS:
        for cname, cm in lins.items():
            parent, _, leaf = cname.rpartition(".")
            if cname not in wanted or leaf not in cons_leaves or cname in covered:
                continue
            pname = f"{parent}.{prod}" if parent else prod
            p = lins.get(pname)
            if not isinstance(p, nn.Linear) or not isinstance(cm, nn.Linear) or cm.in_features % p.out_features:
                continue
            index = None
            if cm.in_features != p.out_features:
                attn = block.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else block
                hd = getattr(attn, "head_dim", None)
                rep = cm.in_features // p.out_features
                if not hd or getattr(attn, "num_key_value_groups", rep) != rep:
                    continue
                c = torch.arange(cm.in_features)
                index = (c // hd // rep) * hd + c % hd
            sharers = _sharers(inputs, cname)
            groups.append(FoldGroup("linear", pname, sharers, [n for n in sharers if n in wanted],
                                    p.out_features, index, shift_ok and p.bias is not None,
                                    complete=all(n in wanted for n in sharers)))
            covered |= set(sharers)
    for x, names in inputs.values():
        names = [n for n in names if n not in covered]
        if not any(n in wanted for n in names):
            continue
        rec = produced.get(id(x))
        kind: Kind = "none"
        producer = None
        shift_ok = False
        if rec is not None and rec[1] is x and isinstance(lins[names[0]], nn.Linear) and \
                all(isinstance(lins[n], nn.Linear) for n in names) and _norm_foldable(norms[rec[0]], False):
            kind, producer = "norm", rec[0]
            shift_ok = shift and _norm_foldable(norms[rec[0]], True)
        names = sorted(names, key=order.get)
        quantizable = all(isinstance(lins[n], nn.Linear) for n in names)
        if not quantizable:
            # a sharer is already quantized (sequential groups): only the still-float ones, no fold
            kind, producer, shift_ok = "none", None, False
            names = [n for n in names if n in wanted]
        c_in = lins[names[0]].in_features
        groups.append(FoldGroup(kind, producer, names, [n for n in names if n in wanted], c_in, None, shift_ok,
                                complete=all(n in wanted for n in names)))
        covered |= set(names)
    missing = wanted - covered
    for n in sorted(missing, key=order.get):     # never reached on the traced sample
        groups.append(FoldGroup("none", None, [n], [n], lins[n].in_features, None, False, complete=True))
    return BlockPlan(groups, reference)


def _sharers(inputs, name: str) -> list[str]:
    for _, names in inputs.values():
        if name in names:
            return list(names)
    return [name]


# ------------------------------------------------------------------------------------------------ apply

@torch.no_grad()
def apply_group(ctx: BlockContext, g: FoldGroup, s_p: torch.Tensor | None, z_p: torch.Tensor | None,
                explicit: bool) -> dict[str, ConsumerTransform]:
    """Apply ``x̃ = (x − z)/s`` (producer channels ``s_p``, ``z_p``; None = 1 / 0) to the float block, folding
    into the producer where possible and registering run-time hooks for the explicit part (removed by
    :func:`finish_transforms`). Returns each consumer's transform."""
    block = ctx.block
    can_scale, can_shift = g.feasible(explicit)
    if s_p is not None and not can_scale:
        s_p = None
    if z_p is not None and (not can_shift or not bool(z_p.abs().gt(0).any())):
        z_p = None
    s_p = None if s_p is None else s_p.float().clamp(min=1e-8)
    ones = torch.ones(g.n_producer)
    absorb_scale = g.kind in ("norm", "linear") and s_p is not None
    absorb_shift = z_p is not None and g.kind != "none" and g.shift_foldable
    s_eff = s_p if s_p is not None else ones
    if g.kind == "norm" and (absorb_scale or absorb_shift):
        norm = block.get_submodule(g.producer)
        norm.weight.div_(s_eff.to(norm.weight.dtype))
        b = getattr(norm, "bias", None)
        if isinstance(b, torch.Tensor):
            if absorb_shift:
                b.sub_(z_p.to(b.dtype))
            b.div_(s_eff.to(b.dtype))
    elif g.kind == "linear" and (absorb_scale or absorb_shift):
        p = block.get_submodule(g.producer)
        p.weight.div_(s_eff.reshape(-1, 1).to(p.weight.dtype))
        if p.bias is not None:
            if absorb_shift:
                p.bias.sub_(z_p.to(p.bias.dtype))
            p.bias.div_(s_eff.to(p.bias.dtype))
    # what is left for run time, in units of what the producer now outputs
    e_scale = None if (absorb_scale or s_p is None) else s_p
    e_shift = None
    if z_p is not None and not absorb_shift:
        e_shift = z_p / s_eff if absorb_scale else z_p
    out = {}
    for name in g.consumers:
        lin = block.get_submodule(name)
        s_c = g.expand(s_eff)
        z_c = None if z_p is None else g.expand(z_p)
        t = ConsumerTransform(s_c, z_c, None if e_scale is None else g.expand(e_scale),
                              None if e_shift is None else g.expand(e_shift),
                              None if lin.bias is None else lin.bias.detach().float().clone())
        w0 = lin.weight.detach().float().clone()
        lin.weight.mul_(s_c.reshape(1, -1).to(lin.weight.dtype))
        if z_c is not None:
            extra = (w0 @ z_c).to(lin.weight.dtype)
            if lin.bias is None:
                lin.bias = nn.Parameter(extra, requires_grad=False)
            else:
                lin.bias.add_(extra)
        if t.explicit:
            t.hooks.append(lin.register_forward_pre_hook(_explicit_hook(t.explicit_shift, t.explicit_scale)))
        out[name] = t
    return out


def _explicit_hook(shift, scale):
    def hook(module, args):
        x = args[0]
        if shift is not None:
            x = x - shift.to(x.dtype)
        if scale is not None:
            x = x / scale.to(x.dtype)
        return (x, *args[1:])
    return hook


def verify_block(ctx: BlockContext, plan: BlockPlan, tol: float) -> float:
    """Relative change of the block output on the traced sample; raises past ``tol``."""
    if plan.reference is None:
        return 0.0
    y = run_one_sample(ctx)
    ref = plan.reference
    rel = float((y - ref).float().norm() / ref.float().norm().clamp(min=1e-30))
    if not math.isfinite(rel) or rel > tol:
        raise FoldVerificationError(
            f"{ctx.stack}.{ctx.index}: migrating channel scales changed the full-precision block output by "
            f"{rel:.2e} (relative; tolerance {tol:g}). A fold rule does not hold for this architecture "
            f"({type(ctx.block).__name__}); report it, or set verify: false / explicit: false to bypass.")
    return rel


def finish_transforms(transforms: dict[str, ConsumerTransform]) -> None:
    for t in transforms.values():
        for h in t.hooks:
            h.remove()
        t.hooks.clear()


# ------------------------------------------------------------------------------------------------ stats

def _transform_channel_stats(st: ChannelStats, s: torch.Tensor, z: torch.Tensor | None) -> ChannelStats:
    out = ChannelStats(st.channels)
    out.count = st.count
    if st.count == 0:
        return out
    s32, s64 = s.float(), s.double()
    z32 = torch.zeros_like(s32) if z is None else z.float()
    z64 = z32.double()
    out.min = (st.min - z32) / s32
    out.max = (st.max - z32) / s32
    n = float(st.count)
    out.sum_first = (st.sum_first - n * z64) / s64
    out.sum_sq = (st.sum_sq - 2 * z64 * st.sum_first + n * z64 * z64) / s64 ** 2
    if z is None:
        out.sum_abs = st.sum_abs / s64
        out.sum_cube = st.sum_cube / s64 ** 3
        out.sum_quad = st.sum_quad / s64 ** 4
    else:   # not recoverable from the sums: make any use loud
        nan = torch.full_like(st.sum_abs, float("nan"))
        out.sum_abs, out.sum_cube, out.sum_quad = nan, nan.clone(), nan.clone()
    return out


def transform_stats(stats: ModalityStats, s: torch.Tensor, z: torch.Tensor | None) -> ModalityStats:
    """Statistics of ``x̃ = (x − z)/s`` from those of ``x`` (module docstring)."""
    out = ModalityStats(stats.channels, stats.name)
    out.all = _transform_channel_stats(stats.all, s, z)
    out.by_modality = {k: _transform_channel_stats(v, s, z) for k, v in stats.by_modality.items()}
    return out


# ------------------------------------------------------------------------------------------------ layers

class InputTransformQuantLinear(QuantLinear):
    """``QuantLinear`` applied to ``x̃ = (x − input_shift) / input_scale`` (an explicit run-time per-channel
    transform where no producer can absorb it; a deployment fuses it into the producer's epilogue)."""

    def __init__(self, in_features, out_features, weight_spec, act, bias, dabc="none"):
        super().__init__(in_features, out_features, weight_spec, act, bias, dabc)
        self.register_buffer("input_shift", torch.zeros(in_features))
        self.register_buffer("input_scale", torch.ones(in_features))

    def set_input_transform(self, shift: torch.Tensor | None, scale: torch.Tensor | None) -> None:
        if shift is not None:
            self.input_shift = shift.detach().float().reshape(-1).clone()
        if scale is not None:
            self.input_scale = scale.detach().float().reshape(-1).clone()

    def forward(self, x, *args, **kwargs):
        x = (x - self.input_shift.to(x.dtype)) / self.input_scale.to(x.dtype)
        return super().forward(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", explicit input transform"


def make_quant_linear(ctx: BlockContext, name: str, lin: nn.Linear, t: ConsumerTransform | None,
                      act_range, weight_quantizer=None) -> QuantLinear:
    """Quantize a transformed consumer: fold-aware GPTQ hook, explicit transform, bias from ``Ŵ'``."""
    base = weight_quantizer if weight_quantizer is not None else ctx.weight_quantizer(name)
    wq = base
    if base is not None and t is not None:
        s = t.scale

        def wq(w, f, perm=None, _b=base, _s=s):
            ss = _s if perm is None else _s[perm]          # f (and w) come in the layer's stored order
            ss = ss if f is None else ss * f
            return _b(w, ss) if perm is None else _b(w, ss, perm)
    cls = InputTransformQuantLinear if (t is not None and t.explicit) else QuantLinear
    q = cls.from_linear(lin, ctx.weight_spec, ctx.act, act_range=act_range, weight_quantizer=wq)
    if t is not None and t.explicit:
        q.set_input_transform(t.explicit_shift, t.explicit_scale)
    if t is not None and t.shift is not None:
        zu = t.shift / t.scale
        w_eff = q.effective_weight()
        bias = torch.zeros(lin.out_features) if t.orig_bias is None else t.orig_bias
        q.bias = (bias + w_eff @ zu.float()).float()
    return q


def static_range_of(ctx: BlockContext, stats: ModalityStats):
    if ctx.act is None or ctx.act.dynamic:
        return None
    st = stats.all
    if ctx.act.spec.granularity == "channel":
        return st.min, st.max
    return st.min.min(), st.max.max()


# ------------------------------------------------------------------------------------------------ search helpers

def simulate_linear(lin: nn.Linear, w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, act, act_range,
                    shift_units: torch.Tensor | None = None, weight_only: bool = False,
                    clip_ratio=None) -> torch.Tensor:
    """Output of the quantized layer that :func:`make_quant_linear` would build (RTN weights), on rows ``x``
    already in the transformed units; ``shift_units`` = ``z/s`` adds ``Ŵ'·z/s`` to the bias."""
    a = None if weight_only else act
    if a is None:      # weights only: the same numbers as QuantLinear's A16 path, without building one
        w_deq = quantize_weight(w.float(), spec, 1.0 if clip_ratio is None else clip_ratio).dequantize()
        y = x.float() @ w_deq.T
        if lin.bias is not None:
            y = y + lin.bias.detach().float()
        if shift_units is not None:
            y = y + shift_units.float() @ w_deq.T
        return y
    wq = None
    if clip_ratio is not None:
        def wq(ww, f, perm=None):
            r = torch.as_tensor(clip_ratio)
            if perm is not None and r.numel() not in (1, r.shape[0]):
                raise ValueError("a per-group clip ratio needs the natural weight groups; use "
                                 "weights.group_order: natural with this search")
            return quantize_weight(ww, spec, clip_ratio)
    q = QuantLinear.from_linear(lin, spec, a, act_range=act_range if a is not None else None, weight=w,
                                weight_quantizer=wq)
    y = q(x)
    if shift_units is not None:
        y = y + shift_units.float() @ q.effective_weight().T
    return y


def modality_weights(ids: torch.Tensor | None, n: int, weighting) -> torch.Tensor:
    """Row weights summing to 1: ``pooled`` (1/N), ``balanced`` (each present modality weighs the same, rows
    within a modality equally), or a dict ``{modality: weight}`` (normalised over present modalities)."""
    if weighting == "pooled" or ids is None:
        return torch.full((n,), 1.0 / n)
    ids = ids.long().reshape(-1)
    present = [m for m in Modality if bool((ids == int(m)).any())]
    groups = []
    for m in present:
        wm = weighting.get(m.label, 0.0) if isinstance(weighting, dict) else 1.0
        groups.append((ids == int(m), float(wm)))
    unknown = ids == PAD
    if bool(unknown.any()):
        groups.append((unknown, 0.0 if isinstance(weighting, dict) else 1.0))
    total = sum(w for _, w in groups)
    if total <= 0:
        return torch.full((n,), 1.0 / n)
    out = torch.zeros(n)
    for sel, wm in groups:
        out[sel] = wm / total / int(sel.sum())
    return out


def weighted_mse(y: torch.Tensor, ref: torch.Tensor, row_w: torch.Tensor) -> float:
    """``Σ_n w_n ‖y_n − ref_n‖² / O`` (row weights sum to 1)."""
    d = (y.float() - ref.float()).pow(2).mean(-1)
    return float((d * row_w).sum())


def per_modality_mse(y: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor | None) -> dict[str, float]:
    d = (y.float() - ref.float()).pow(2).mean(-1)
    out = {"all": float(d.mean())}
    if ids is not None:
        for m in Modality:
            sel = ids.long() == int(m)
            if bool(sel.any()):
                out[m.label] = float(d[sel].mean())
    return out


# ------------------------------------------------------------------------------------------------ method base


class ScalingOptions(MethodOptions):
    explicit: bool = False
    """Where no producer can absorb the transform (e.g. an RMSNorm and a shift, or o_proj/down_proj in
    sequential mode), apply it at run time before quantization (an extra per-channel op); false = leave that
    input untransformed."""
    verify: bool = True
    """Re-run the block on one calibration sample after folding and require the same full-precision output."""
    verify_tol: float = Field(1e-3, gt=0)
    max_search_rows: int = Field(1024, ge=16)
    """Sampled input rows used by searches (evenly spaced over the pipeline's sampled rows)."""


@dataclass
class GroupData:
    """What a scale search sees for one group: rows ``x`` of the shared input, their modality ids, statistics
    (consumer channels), the current float weights/biases of the quantized consumers and their outputs."""

    stats: ModalityStats
    weights: dict[str, torch.Tensor]
    all_weights: dict[str, torch.Tensor]
    x: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    y_fp: dict[str, torch.Tensor] = field(default_factory=dict)


class ChannelScalingMethod(Method):
    """Base of the migration methods: subclasses implement :meth:`choose` (per group, producer channels)."""

    uses_shift = False

    def choose(self, ctx: BlockContext, g: FoldGroup, data: GroupData) -> tuple[torch.Tensor | None,
                                                                             torch.Tensor | None, dict]:
        raise NotImplementedError

    def weight_quantizer_for(self, ctx: BlockContext, name: str, t: ConsumerTransform | None, data: GroupData):
        """Override the weight quantizer of one consumer (None = the pipeline's: RTN or GPTQ)."""
        return

    # -------------------------------------------------------------- helpers for subclasses
    def _group_data(self, ctx: BlockContext, g: FoldGroup) -> GroupData:
        first = g.quantized[0]
        weights = {n: ctx.block.get_submodule(n).weight.detach().float() for n in g.quantized}
        all_w = {n: ctx.block.get_submodule(n).weight.detach().float() for n in g.consumers}
        data = GroupData(ctx.stats[first], weights, all_w)
        if self.needs_inputs and ctx.sampler is not None:
            x = ctx.sampler.rows(first)
            ids = ctx.sampler.ids(first)
            n = x.shape[0]
            m = self.options.max_search_rows
            if n > m:
                sel = torch.linspace(0, n - 1, m).round().long()
                x, ids = x[sel], ids[sel]
            data.x, data.ids = x, ids
            for name in g.quantized:
                lin = ctx.block.get_submodule(name)
                y = x @ weights[name].T
                if lin.bias is not None:
                    y = y + lin.bias.detach().float()
                data.y_fp[name] = y
        return data

    def search_loss(self, ctx: BlockContext, g: FoldGroup, data: GroupData, s_p: torch.Tensor | None,
                    z_p: torch.Tensor | None, row_w: torch.Tensor, weight_only: bool) -> float:
        """Weighted output MSE of the quantized consumers for one candidate (``Σ`` over consumers)."""
        s_c = torch.ones(data.x.shape[1]) if s_p is None else g.expand(s_p)
        z_c = None if z_p is None else g.expand(z_p)
        xt = data.x if z_c is None else data.x - z_c
        xt = xt / s_c
        st = None
        if ctx.act is not None and not ctx.act.dynamic and not weight_only:
            st = static_range_of(ctx, transform_stats(data.stats, s_c, z_c))
        total = 0.0
        for name in g.quantized:
            lin = ctx.block.get_submodule(name)
            w = data.weights[name] * s_c.reshape(1, -1)
            y = simulate_linear(lin, w, xt, ctx.weight_spec, ctx.act, st,
                                None if z_c is None else z_c / s_c, weight_only)
            total += weighted_mse(y, data.y_fp[name], row_w)
        return total

    # -------------------------------------------------------------- the block
    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantLinear]:
        transforms, datas = self.transform_block(ctx)
        out = {}
        for name, lin in ctx.linears.items():
            t = transforms.get(name)
            stats = ctx.stats[name] if t is None else transform_stats(ctx.stats[name], t.scale, t.shift)
            wq = self.weight_quantizer_for(ctx, name, t, datas.get(name))
            out[name] = make_quant_linear(ctx, name, lin, t, static_range_of(ctx, stats), wq)
        return out

    def transform_block(self, ctx: BlockContext) -> tuple[dict[str, ConsumerTransform], dict[str, GroupData]]:
        """Choose and apply every group's transform to the float block (folds in place, explicit parts
        returned); verifies the block still computes its full-precision output."""
        o = self.options
        plan = plan_block(ctx, shift=self.uses_shift)
        transforms: dict[str, ConsumerTransform] = {}
        datas: dict[str, GroupData] = {}
        try:
            for g in plan.groups:
                if not g.quantized:
                    continue
                data = self._group_data(ctx, g)
                can_scale, can_shift = g.feasible(o.explicit)
                s_p, z_p, info = self.choose(ctx, g, data) if (can_scale or can_shift) else (None, None, {})
                if not can_scale:
                    s_p = None
                if not can_shift:
                    z_p = None
                rep = {"group": g.label, "fold": g.kind, **info}
                if not (can_scale or can_shift):
                    rep["transform"] = "skipped: no producer absorbs it (set explicit: true to apply it at run time)"
                if s_p is not None or z_p is not None:
                    tr = apply_group(ctx, g, s_p, z_p, o.explicit)
                    transforms.update(tr)
                    t0 = tr[g.consumers[0]]
                    rep["explicit"] = t0.explicit
                    rep["scale_range"] = [float(t0.scale.min()), float(t0.scale.max())]
                    if t0.shift is not None:
                        rep["shift_absmax"] = float(t0.shift.abs().max())
                for n in g.quantized:
                    datas[n] = data
                    ctx.report.setdefault(n, {}).update(rep)
            if o.verify and transforms:
                rel = verify_block(ctx, plan, o.verify_tol)
                for n in ctx.linears:
                    ctx.report.setdefault(n, {})["fold_rel_change"] = rel
        finally:
            finish_transforms(transforms)
        return transforms, datas

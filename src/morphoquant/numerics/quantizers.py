"""Uniform integer and code-book quantizers: the one numerics module behind fake-quant, export and runtime.

Conventions (all 2-D after flattening leading dims; the *last* axis is the GEMM reduction axis C):

* weights ``W[O, C]``: ``channel`` = one scale per output row, ``group`` = one scale per row and per block of
  ``group_size`` consecutive input channels (a last, shorter group is allowed), ``tensor`` = one scale;
* activations ``X[N, C]``: ``token`` = one scale per row (dynamic), ``channel`` = one scale per input column
  (static, calibrated), ``tensor`` = one scale.

Uniform quantizer with step ``s`` and zero point ``z`` (Eq. 1 of the paper)::

    q = clamp(round(x / s) + z, q_min, q_max),     x̂ = s · (q − z)

symmetric:  q ∈ [−2^(b−1), 2^(b−1) − 1],  s = max(|lo|, |hi|) / (2^(b−1) − 1),  z = 0
            (``full_range``: s = max(|lo|, |hi|) / (2^(b−1) − ½): a finer step, ±amax on rounding boundaries)
asymmetric: q ∈ [0, 2^b − 1],             s = (hi' − lo') / (2^b − 1),  z = round(−lo' / s),
            with lo' = min(lo, 0), hi' = max(hi, 0) so that 0 is exactly representable.

Every parameter is computed in fp32 whatever the input dtype (method.md §3 defect 1). Rounding is
round-half-to-even (``torch.round``), the same as an integer kernel's ``nearbyint``.

Code books (4-bit weights only): NF4 (normal-float levels in [−1, 1], scale = absmax) and FP4 E2M1
(levels ±{0, .5, 1, 1.5, 2, 3, 4, 6}, scale = absmax / 6). Codes are stored as unsigned indices 0..15.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Granularity = Literal["tensor", "channel", "group", "token"]
Role = Literal["weight", "activation"]
NumberFormat = Literal["int", "nf4", "fp4"]
GroupOrder = Literal["natural", "act_scale"]

# Scales below this are replaced by it: an all-zero row/channel must not produce inf/NaN.
MIN_SCALE = 1e-8

# NormalFloat-4 levels (QLoRA): quantiles of N(0, 1) normalised to [-1, 1], with an exact 0.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)
# FP4 E2M1 levels indexed by the 4-bit code (sign bit high): codes 0..7 positive, 8..15 negative.
FP4_E2M1_LEVELS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                                -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32)


class QuantConfigError(ValueError):
    """An impossible quantization setting (bits, group size, granularity ...)."""


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``granularity`` is interpreted with ``role`` (see module docstring). ``group_size`` is required for
    ``granularity == "group"``. ``fmt`` ``nf4``/``fp4`` are 4-bit weight code books (always symmetric).
    """

    bits: int = 4
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int | None = None
    fmt: NumberFormat = "int"
    full_range: bool = False
    """Symmetric int only: ``s = amax / (q_max + ½)`` (the rule of compressed-tensors/llm-compressor): the grid
    ``s·[q_min, q_max]`` then spans ``[−amax − ½s, amax − ½s]``, ±amax lie on rounding boundaries, the step is
    finer (by 7 % at 4 bits) and values near +amax are clipped by at most half a step — in effect a mild clip
    of the range. false: ``s = amax / q_max`` (nothing clipped, the code ``q_min`` never used)."""
    group_order: GroupOrder = "natural"
    """Which input channels share a weight group. ``natural``: ``group_size`` consecutive channels.
    ``act_scale`` (weights of a layer with static per-input-channel activation scales ``s`` only): the groups
    are formed over the channels sorted by ``s``, i.e. over the columns of ``W diag(s)`` permuted by
    ``π = argsort(s)``. Folding ``s`` makes the column magnitudes of ``W diag(s)`` follow ``s``; sorting puts
    columns of like magnitude into one group, so a group's step is not set by one large-scale column. The
    GEMM's reduction axis is permuted for both operands, ``Σ_c x_c w_c = Σ_j x_π(j) w_π(j)``, so the integer
    result is the same sum; the layer stores its weights, scales and outlier indices in the permuted order and
    gathers ``x[:, π]`` before quantizing (the ``g_idx`` of GPTQ act-order checkpoints). Applied by
    :class:`morphoquant.layers.QuantLinear`; the functions of this module always group consecutive channels."""

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise QuantConfigError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if self.granularity not in ("tensor", "channel", "group", "token"):
            raise QuantConfigError(f"unknown granularity {self.granularity!r}")
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise QuantConfigError(f"granularity 'group' needs a positive integer group_size, got "
                                   f"{self.group_size!r}")
        if self.fmt not in ("int", "nf4", "fp4"):
            raise QuantConfigError(f"unknown number format {self.fmt!r}; use int, nf4 or fp4")
        if self.fmt != "int" and (self.bits != 4 or not self.symmetric):
            raise QuantConfigError(f"{self.fmt} is a symmetric 4-bit code book: set bits=4, symmetric=true")
        if self.group_order not in ("natural", "act_scale"):
            raise QuantConfigError(f"unknown group_order {self.group_order!r}; use natural or act_scale")
        if self.group_order != "natural" and self.granularity != "group":
            raise QuantConfigError(f"group_order {self.group_order!r} forms weight groups: it needs granularity "
                                   f"'group' (got {self.granularity!r}); drop it or set granularity: group")
        if self.full_range and (self.fmt != "int" or not self.symmetric):
            raise QuantConfigError("full_range applies to symmetric int formats only: drop it or set "
                                   "symmetric=true, format=int")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    @property
    def symmetric_divisor(self) -> float:
        """``amax / s`` of the symmetric rule: ``q_max`` (or ``q_max + ½`` with ``full_range``)."""
        return self.qmax + 0.5 if self.full_range else float(self.qmax)

    @property
    def code_dtype(self) -> torch.dtype:
        """Smallest integer dtype holding every code (asymmetric 8-bit needs 0..255)."""
        if self.fmt != "int":
            return torch.uint8
        return torch.int8 if self.qmax <= 127 else torch.int16

    @property
    def levels(self) -> torch.Tensor | None:
        return {"nf4": NF4_LEVELS, "fp4": FP4_E2M1_LEVELS}.get(self.fmt)


# ----------------------------------------------------------------------------------------------------------
# shaping helpers
# ----------------------------------------------------------------------------------------------------------

def _group_view(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """``[..., C] -> [..., ceil(C/g), g]`` with zero padding of a last partial group; returns (view, C)."""
    c = x.shape[-1]
    pad = (-c) % group_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size), c


def _ungroup(x: torch.Tensor, c: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])[..., :c]


def observe_range(x: torch.Tensor, spec: QuantSpec, role: Role) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (lo, hi) of ``x`` at the granularity of ``spec``, shaped to broadcast against ``x``.

    For ``group`` the returned tensors broadcast against the grouped view ``[..., G, g]`` (see
    :func:`quantize`). ``channel`` means rows for weights and columns for activations.
    """
    x = x.detach().float()
    g = spec.granularity
    if g == "tensor":
        return x.amin().reshape([1] * x.dim()), x.amax().reshape([1] * x.dim())
    if g == "group":
        xg, _ = _group_view(x, spec.group_size)
        return xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    if g == "token" or (g == "channel" and role == "weight"):
        return x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    # activation per input channel: reduce over every leading axis
    flat = x.reshape(-1, x.shape[-1])
    return flat.amin(0), flat.amax(0)


def range_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (scale, zero_point) for the range [lo, hi] (see module docstring); zero_point is integer-valued."""
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32)
    if spec.fmt != "int":
        amax = torch.maximum(lo.abs(), hi.abs())
        denom = 1.0 if spec.fmt == "nf4" else 6.0
        return (amax / denom).clamp(min=MIN_SCALE), torch.zeros_like(amax)
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return (amax / spec.symmetric_divisor).clamp(min=MIN_SCALE), torch.zeros_like(amax)
    lo0, hi0 = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = ((hi0 - lo0) / (spec.qmax - spec.qmin)).clamp(min=MIN_SCALE)
    zero = torch.clamp(torch.round(-lo0 / scale) + spec.qmin, spec.qmin, spec.qmax)
    return scale, zero


def compute_qparams(x: torch.Tensor, spec: QuantSpec, role: Role,
                    clip_ratio: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max (optionally shrunk by ``clip_ratio``) → (scale, zero_point) at the granularity of ``spec``."""
    lo, hi = observe_range(x, spec, role)
    return range_qparams(lo * clip_ratio, hi * clip_ratio, spec)


# ----------------------------------------------------------------------------------------------------------
# quantize / dequantize
# ----------------------------------------------------------------------------------------------------------

def _codebook_quantize(x: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code-book level of ``x / scale`` (ties to the lower level)."""
    y = x.float() / scale
    order = torch.argsort(levels)
    sorted_levels = levels[order]
    mids = (sorted_levels[1:] + sorted_levels[:-1]) / 2
    pos = torch.bucketize(y, mids)
    return order[pos].to(torch.uint8)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s) + z, q_min, q_max)`` (code-book index for nf4/fp4).

    ``scale``/``zero_point`` must broadcast against ``x`` — for ``group`` granularity against the grouped
    view; this function groups and ungroups by itself when ``scale`` has one more dim than ``x``.
    """
    grouped = spec.granularity == "group" and scale.dim() == x.dim() + 1
    c = x.shape[-1]
    if grouped:
        x, c = _group_view(x.float(), spec.group_size)
    if spec.fmt != "int":
        q = _codebook_quantize(x, scale, spec.levels)
    else:
        q = torch.clamp(torch.round(x.float() / scale) + zero_point, spec.qmin, spec.qmax).to(spec.code_dtype)
    return _ungroup(q, c) if grouped else q


def quantize_to_float(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      spec: QuantSpec) -> torch.Tensor:
    """The codes of :func:`quantize` (uniform formats, non-grouped parameters) held in an fp32 tensor —
    the form the fake-quant GEMM consumes, without integer dtype round trips."""
    q = torch.round(x.float() / scale)
    if zero_point is not None:
        q = q + zero_point
    return q.clamp_(spec.qmin, spec.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x̂ = s · (q − z)`` in fp32 (``s · level[q]`` for code books)."""
    grouped = spec.granularity == "group" and scale.dim() == q.dim() + 1
    c = q.shape[-1]
    if grouped:
        q, c = _group_view(q, spec.group_size)
    if spec.fmt != "int":
        x = spec.levels[q.long()] * scale
    else:
        x = (q.float() - zero_point) * scale
    return _ungroup(x, c) if grouped else x


def fake_quantize(x: torch.Tensor, spec: QuantSpec, role: Role, clip_ratio: float | torch.Tensor = 1.0,
                  scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize (parameters from ``x`` itself unless ``scale``/``zero_point`` are given)."""
    if scale is None:
        scale, zero_point = compute_qparams(x, spec, role, clip_ratio)
    return dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec).to(x.dtype)


@dataclass
class QuantizedTensor:
    """Integer codes plus their fp32 parameters; ``shape`` is the original shape."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, self.spec)


def quantize_weight(w: torch.Tensor, spec: QuantSpec, clip_ratio: float | torch.Tensor = 1.0) -> QuantizedTensor:
    """Weight ``W[O, C]`` → codes and parameters (per output row, per group along C, or per tensor)."""
    if w.dim() != 2:
        raise QuantConfigError(f"weights must be 2-D [out, in], got shape {tuple(w.shape)}")
    if spec.granularity == "token":
        raise QuantConfigError("granularity 'token' is for activations; use channel, group or tensor for weights")
    scale, zero = compute_qparams(w, spec, "weight", clip_ratio)
    return QuantizedTensor(quantize(w, scale, zero, spec), scale, zero, spec)

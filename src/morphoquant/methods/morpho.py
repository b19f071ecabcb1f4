"""MorphoQuant: DABC residual compensation + MDQFO clip search (method.md; paper Eq. 5–10).

Per linear layer, from calibration statistics with padding excluded:

1. **Outlier channels** (Eq. 5–6): dispersion ``D_c = (max_c − min_c) / log1p(mean|x_c| + ε)``; channel ``c`` is
   an outlier when ``D_c`` exceeds ``μ + kσ`` of this layer (local) or of every quantized layer (global). The
   16-bit share is capped by ``budget`` (the channels with the highest scores are kept).
2. **DABC** (Eq. 7): ``Y = W_Q X_Q + b + W_Q((X − X_Q) ⊙ M)``. ``dense``: ``M`` = the outlier channels; their
   residual goes through a thin 16-bit product over those columns. ``sparse``: only elements with
   ``|x| > ρ·α_c`` of outlier channels (the authors' code), with a per-layer budget on bypassed elements.
3. **MDQFO** (Eq. 8–10): each compliant channel gets a clip ratio ``r_c`` (range ``r_c · base_c``) minimising,
   with DABC active,

       L = L_p + λ_cos · L_cos,   L_p = E_{n,c} |x − x̂(r)|^p,   L_cos = 1 − E_n cos(x_n, x̂_n)           (Eq. 8–9)

   over **all** calibration rows (sums, not an EMA — ``accumulate: ema`` reproduces the authors' EMA). The search
   is a grid vectorised over channels × candidates; ``L_p`` is separable per channel, the per-token cosine is
   not: it is handled by Jacobi sweeps that evaluate, for every channel and candidate, the exact change of each
   token's cosine when that channel alone switches (other channels at their current choice). An optional
   golden-section refinement polishes ``r_c`` between grid neighbours (on ``L_p``).
4. **Modality awareness** (our extension): every expectation above is a weighted mean over rows, the weights
   either pooled (``1/N``) or balanced per modality (``w_m / N_m``, equal ``w_m`` by default), so a rare
   modality's tokens weigh as much as the dominant one's; losses are reported per modality.
5. **Online Hadamard** (our extension, option ``online_hadamard``): chosen linears (e.g. ``down_proj``) compute
   ``(x H)(W H)ᵀ = x Wᵀ`` with an orthonormal Hadamard ``H``, set up before any statistic, so steps 1–3 see the
   rotated input, whose outliers are spread over all channels (docs/results.md, "Online Hadamard before
   ``down_proj``").

Static per-input-channel scales are folded into the weights before weight quantization (see ``QuantLinear``).
Because a dense-DABC outlier channel is reconstructed exactly whatever its scale, its scale is set to the median
scale of the compliant channels: that keeps its folded weight column from inflating the weight quantization
step of its group. With dynamic per-token activations, ``α_c`` is a clip applied before per-token scaling.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..layers import QuantLinear
from ..numerics import QuantSpec, dequantize, quantize, quantize_weight, range_qparams
from ..statistics import Modality, ModalityStats
from ..statistics.dispersion import Threshold, global_threshold, modality_outlier_mask
from .base import BlockContext, Method, MethodOptions, register
from .quarot import HadamardLinear, HadamardQuantLinear, online_hadamard_linear, quantize_online


class MorphoOptions(MethodOptions):
    # --- outlier channels (Eq. 5-6)
    k: float = Field(2.0, gt=0)
    thresholds: Literal["local", "global", "local+global"] = "local+global"
    per_modality_outliers: bool = False
    down_proj_all_outliers: bool = False
    """Reference semantics: every channel of every mlp.down_proj is an outlier channel."""
    # --- DABC (Eq. 7)
    dabc: Literal["dense", "sparse", "none"] = "dense"
    rho: float = Field(0.8, gt=0)
    budget: float | None = Field(0.05, gt=0, le=1)
    """dense: max fraction of a layer's input channels on the 16-bit path; sparse: max fraction of its
    activation elements. None = unbounded (the authors' code)."""
    # --- MDQFO (Eq. 8-10)
    clip_search: bool = True
    grid_points: int = Field(20, ge=1)
    grid_low: float = Field(0.3, gt=0, le=1)
    grid_high: float = Field(1.0, gt=0, le=1)
    grid_spacing: Literal["linear", "log"] = "linear"
    p: float = Field(2.0, gt=0)
    lambda_cos: float = Field(1.0, ge=0)
    cos_sweeps: int = Field(2, ge=0)
    refine: Literal["none", "golden"] = "none"
    refine_steps: int = Field(8, ge=1)
    base_interval: Literal["symmetric", "minmax", "reference"] = "symmetric"
    """symmetric: ±max|x| (the paper's ±α); minmax: [min, max]; reference: the authors' rule (shorter side of a
    zero-straddling range for outliers, longer side for the others, one-signed channels keep [min, max])."""
    accumulate: Literal["sum", "ema"] = "sum"
    ema_momentum: float = Field(0.5, ge=0, lt=1)
    search_batch_rows: int = Field(512, ge=1)
    # --- modality awareness
    modality_weighting: Literal["pooled", "balanced"] | dict[str, float] = "pooled"
    outlier_scale: Literal["search", "median", "own"] = "search"
    """Scale given to dense-DABC outlier channels before folding: ``search`` minimises the weight error those
    channels cause (see :func:`search_outlier_scales`), ``median`` = median of the compliant channels, ``own`` =
    their calibrated range."""
    outlier_scale_points: int = Field(33, ge=2)
    modality_ranges: bool = False
    """Our extension 4b: a separate activation range per modality for the same layer, ``t_m`` times the layer's
    range (see :func:`search_modality_scales`); deployable as a per-row scale of the GEMM epilogue."""
    modality_range_low: float = Field(0.25, gt=0)
    modality_range_high: float = Field(4.0, gt=0)
    modality_range_points: int = Field(25, ge=2)
    modality_range_min_rows: int = Field(32, ge=1)
    # --- online Hadamard (our extension 5)
    online_hadamard: list[str] = Field(default_factory=list)
    """Suffixes of linears (e.g. ``[down_proj]``, ``[fc2]`` for Whisper) whose input gets an online Hadamard
    ``x ↦ x H`` (weight ``W ← W H``, the same function) before any statistic: outlier channels are spread over
    all channels, so the static per-channel ranges of those inputs shrink. Costs one fast Hadamard transform of
    the input at run time (deployed with the checkpoint, ``online_hadamard`` in docs/serving.md)."""
    hadamard_max_block: int = Field(512, ge=1)
    """Largest dense Paley factor of a non-power-of-two width (beyond: a seeded random orthogonal factor)."""

    @model_validator(mode="after")
    def _grid(self):
        if self.grid_low > self.grid_high:
            raise ValueError(f"grid_low ({self.grid_low}) must not exceed grid_high ({self.grid_high})")
        if isinstance(self.modality_weighting, dict):
            bad = set(self.modality_weighting) - {m.label for m in Modality}
            if bad:
                raise ValueError(f"modality_weighting has unknown modalities {sorted(bad)}")
        return self

    def grid(self) -> torch.Tensor:
        if self.grid_points == 1:
            return torch.tensor([self.grid_high])
        if self.grid_spacing == "log":
            return torch.logspace(math.log10(self.grid_low), math.log10(self.grid_high), self.grid_points)
        return torch.linspace(self.grid_low, self.grid_high, self.grid_points)


# ------------------------------------------------------------------------------------------------ helpers

def row_weights(ids: torch.Tensor | None, n: int, weighting) -> torch.Tensor:
    """Per-row weights summing to 1: pooled ``1/N``, or per modality ``w_m / N_m`` (normalised over present m)."""
    if weighting == "pooled" or ids is None:
        return torch.full((n,), 1.0 / n)
    ids = ids.long()
    w = torch.zeros(n)
    present = [m for m in Modality if bool((ids == int(m)).any())]
    unknown = ids < 0
    groups = [(ids == int(m), (weighting.get(m.label, 0.0) if isinstance(weighting, dict) else 1.0))
              for m in present]
    if bool(unknown.any()):
        groups.append((unknown, 1.0 if not isinstance(weighting, dict) else 0.0))
    total = sum(wm for _, wm in groups)
    if total <= 0:
        return torch.full((n,), 1.0 / n)
    for sel, wm in groups:
        w[sel] = wm / total / int(sel.sum())
    return w


def base_interval(lo: torch.Tensor, hi: torch.Tensor, outliers: torch.Tensor, rule: str):
    """Per-channel base range that candidate ratios shrink (see ``MorphoOptions.base_interval``)."""
    if rule == "minmax":
        return lo.clone(), hi.clone()
    amax = torch.maximum(lo.abs(), hi.abs())
    if rule == "symmetric":
        return -amax, amax
    straddle = (lo < 0) & (hi > 0)
    short, long_ = torch.minimum(-lo, hi), torch.maximum(-lo, hi)
    alpha = torch.where(outliers, short, long_)
    return torch.where(straddle, -alpha, lo), torch.where(straddle, alpha, hi)


def fake_channel(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Static per-channel quantize-dequantize of ``x[N, C]`` with ranges ``[lo_c, hi_c]``."""
    s, z = range_qparams(lo, hi, spec)
    # in place on one buffer: the search calls this grid × layers times on [rows, C] (same values as
    # s * (clamp(round(x / s) + z) - z))
    q = torch.div(x, s)
    q.round_().add_(z).clamp_(spec.qmin, spec.qmax).sub_(z)
    return q.mul_(s)


def fake_token_clipped(x: torch.Tensor, alpha: torch.Tensor, spec: QuantSpec,
                       token_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Clip each channel to ``±α_c``, then dynamic per-token quantize-dequantize (scale given or computed)."""
    xc = torch.maximum(torch.minimum(x, alpha), -alpha)
    if token_scale is None:
        token_scale, _ = range_qparams(xc.amin(-1, keepdim=True), xc.amax(-1, keepdim=True), spec)
    q = torch.clamp(torch.round(xc / token_scale), spec.qmin, spec.qmax)
    return q * token_scale


def search_outlier_scales(w: torch.Tensor, scale: torch.Tensor, outlier_idx: torch.Tensor, m2: torch.Tensor,
                          weight_spec: QuantSpec, points: int = 33) -> torch.Tensor:
    """Activation scales for dense-DABC outlier channels that minimise the folded weight error.

    A dense-DABC channel's activation reaches the product exactly whatever its scale ``s_c`` (the residual
    ``x/s_c − (x_q − z)`` restores it), so ``s_c`` only decides how its weight column is quantized once folded:
    ``Ŵ_{:,c} = Q_w(W·diag(s))_{:,c} / s_c``. A small ``s_c`` makes the folded column tiny next to its weight
    group and rounds it to zero (ruinous when ``x_c`` is a massive activation); a large one makes it dominate the
    group's scale and crushes the neighbours. We pick ``s_c`` minimising the expected output error of the weight
    group(s) it belongs to (diagonal approximation of the input second moments ``m2_j = E[x_j²]``)::

        E(s_c) = Σ_o Σ_{j∈G(c)} m2_j · (W_oj − Ŵ_oj(s_c))²

    over a geometric grid spanning ``[min(s_med, s_c^own)/16, 4·max(s_med, s_c^own)]`` (one coordinate pass over
    the outlier channels in index order; others at their current value).
    """
    s = scale.clone()
    if outlier_idx.numel() == 0:
        return s
    c = w.shape[1]
    mask = torch.zeros(c, dtype=torch.bool)
    mask[outlier_idx] = True
    s_med = scale[~mask].median() if bool((~mask).any()) else scale.median()
    if weight_spec.granularity == "tensor":     # one scale for the whole matrix: no per-group trade-off to make
        s[outlier_idx] = s_med
        return s
    width = weight_spec.group_size if weight_spec.granularity == "group" else c
    for ch in outlier_idx.tolist():
        a = (ch // width) * width
        b = min(a + width, c)
        lo = min(float(s_med), float(scale[ch])) / 16
        hi = max(float(s_med), float(scale[ch])) * 4
        cands = torch.logspace(math.log10(lo), math.log10(hi), points)
        if weight_spec.granularity == "channel" and c > 1:
            s[ch] = cands[int(_row_scale_errors(w, s, ch, cands, m2, weight_spec).argmin())]
            continue
        sub = s[a:b].clone().reshape(1, -1).repeat(points, 1)
        sub[:, ch - a] = cands
        wf = w[:, a:b].unsqueeze(0) * sub.unsqueeze(1)                       # [P, O, width] folded
        flat = wf.reshape(-1, b - a)
        spec = dataclasses.replace(weight_spec, group_size=b - a) if weight_spec.granularity == "group" \
            else weight_spec
        deq = quantize_weight(flat, spec).dequantize().reshape(points, w.shape[0], b - a) / sub.unsqueeze(1)
        err = ((w[:, a:b].unsqueeze(0) - deq).pow(2) * m2[a:b].reshape(1, 1, -1)).sum((1, 2))
        s[ch] = cands[int(err.argmin())]
    return s


ROW_SEARCH_BYTES = 64 * 2 ** 20
"""Largest buffer of :func:`_row_scale_errors` (the rows it re-quantizes in full, in chunks)."""


def _row_scale_errors(w: torch.Tensor, s: torch.Tensor, ch: int, cands: torch.Tensor, m2: torch.Tensor,
                      spec: QuantSpec) -> torch.Tensor:
    """``E(s_c)`` of :func:`search_outlier_scales` for every candidate, per-row weight scales (``channel``).

    The same errors as quantizing the ``[P, O, C]`` stack of folded matrices, at ``O(O·C)`` plus the rows that
    change instead of ``O(P·O·C)``: a row's quantization parameters depend only on its min and max, so when the
    candidate's folded entry ``W_oc·s_c`` lies inside the range of the row's *other* entries, every other entry
    dequantizes exactly as at any such candidate, and only column ``c``'s term changes. Rows where the entry
    sets the min or max are re-quantized in full. Each element's error is computed by the same operations as
    the stacked form; only the order of the final sums differs (the chosen candidate can differ only on a
    near-tie of errors within float rounding).
    """
    wf = w * s                                                   # [O, C] folded at the current scales
    rest = torch.cat([wf[:, :ch], wf[:, ch + 1:]], dim=1)
    lo_ex, hi_ex = rest.amin(1, keepdim=True), rest.amax(1, keepdim=True)
    qs, qz = range_qparams(lo_ex, hi_ex, spec)                   # the rows' parameters while unchanged
    err = (w - dequantize(quantize(wf, qs, qz, spec), qs, qz, spec) / s).pow_(2).mul_(m2)
    err[:, ch] = 0
    base = err.sum(1)                                            # [O] error of the other columns
    v = w[:, ch].unsqueeze(0) * cands.unsqueeze(1)               # [P, O] the candidates' folded entries
    keep = (v >= lo_ex.T) & (v <= hi_ex.T)
    col = dequantize(quantize(v, qs.T, qz.T, spec), qs.T, qz.T, spec) / cands.unsqueeze(1)
    total = torch.where(keep, base + (w[:, ch] - col).pow(2) * m2[ch], torch.zeros(()))
    p_idx, o_idx = (~keep).nonzero(as_tuple=True)
    chunk = max(1, ROW_SEARCH_BYTES // (4 * w.shape[1] * 3))
    for i in range(0, p_idx.numel(), chunk):
        p, o = p_idx[i:i + chunk], o_idx[i:i + chunk]
        rows = wf[o]
        rows[:, ch] = v[p, o]
        srow = s.expand(p.numel(), -1).clone()
        srow[:, ch] = cands[p]
        deq = quantize_weight(rows, spec).dequantize() / srow
        total[p, o] = (w[o] - deq).pow_(2).mul_(m2).sum(1)
    return total.sum(1)


def search_modality_scales(x: torch.Tensor, ids: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor,
                           outliers: torch.Tensor, opts: MorphoOptions, spec: QuantSpec,
                           dynamic: bool) -> tuple[torch.Tensor | None, dict]:
    """Per-modality range multipliers ``t_m`` (our extension 4b).

    With the per-channel ranges ``[lo_c, hi_c]`` fixed, the rows of modality ``m`` are quantized with the range
    ``t_m·[lo_c, hi_c]`` (static: scale ``t_m s_c``, same zero point; dynamic: clip ``±t_m α_c``), ``t_m``
    minimising that modality's own ``L_p + λ_cos·L_cos`` over a geometric grid in ``[low, high]`` (DABC active, so
    outlier channels stay exact). Returns ``t[M+1]`` (pooled fallback = 1), or None when fewer than two
    modalities have ``min_rows`` rows (one modality: the per-channel ranges already fit it).
    """
    if ids is None:
        return None, {}
    present = [m for m in Modality if int((ids == int(m)).sum()) >= opts.modality_range_min_rows]
    if len(present) < 2:
        return None, {}
    grid = torch.logspace(math.log10(opts.modality_range_low), math.log10(opts.modality_range_high),
                          opts.modality_range_points)
    t = torch.ones(len(Modality) + 1)
    s, z = range_qparams(lo, hi, spec)
    alpha = torch.maximum(lo.abs(), hi.abs())
    info = {}
    for m in present:
        xm = x[ids == int(m)]
        nx = xm.norm(dim=1).clamp(min=1e-12)
        best, best_t = math.inf, 1.0
        for tj in grid.tolist():
            if dynamic:
                xh = fake_token_clipped(xm, alpha * tj, spec)
            else:
                q = torch.clamp(torch.round(xm / (s * tj)) + z, spec.qmin, spec.qmax)
                xh = (q - z) * (s * tj)
            xh = torch.where(outliers, xm, xh) if opts.dabc == "dense" else xh
            loss = float((xm - xh).abs().pow(opts.p).mean())
            if opts.lambda_cos > 0:
                cos = (xm * xh).sum(1) / (nx * xh.norm(dim=1).clamp(min=1e-12))
                loss += opts.lambda_cos * float(1 - cos.mean())
            if loss < best:
                best, best_t = loss, tj
        t[int(m)] = best_t
        info[m.label] = best_t
    return t, {"modality_range_scale": info}


SWEEP_CANDIDATE_BYTES = 256 * 2 ** 20
"""Largest size of the cosine sweeps' grid candidates held at once (the search's largest buffer); above it each
candidate is rebuilt on use."""


class ClipSearch:
    """Vectorised MDQFO grid search for one layer (class docstring of the module, step 3)."""

    def __init__(self, opts: MorphoOptions, spec: QuantSpec, dynamic: bool):
        self.o, self.spec, self.dynamic = opts, spec, dynamic

    def _reconstruct(self, x, r, lo, hi, outliers, token_scale=None):
        """x̂(r) with DABC active and the number of bypassed elements per channel; x̂ is always a new tensor (the
        callers overwrite it in place)."""
        if self.dynamic:
            alpha = r * torch.maximum(lo.abs(), hi.abs())
            xh = fake_token_clipped(x, alpha, self.spec, token_scale)
        else:
            alpha = r * torch.maximum(lo.abs(), hi.abs())
            xh = fake_channel(x, r * lo, r * hi, self.spec)
        bypass = torch.zeros(x.shape[1])
        if self.o.dabc == "dense":
            cols = outliers.nonzero().flatten()      # a few columns: copy them, not a full [N, C] where
            xh[:, cols] = x[:, cols]
            bypass = outliers.float() * x.shape[0]
        elif self.o.dabc == "sparse":
            by = outliers & (x.abs() > self.o.rho * alpha)
            xh = torch.where(by, x, xh)
            bypass = by.float().sum(0)
        return xh, bypass

    def _lp(self, x, xh, w):
        # [C], weighted mean over rows; xh is a fresh reconstruction, reused in place
        return xh.sub_(x).abs_().pow_(self.o.p).mul_(w.reshape(-1, 1)).sum(0)

    def _batched_lp(self, x, r, lo, hi, outliers, w, token_scale):
        """L_p per channel, summed over all rows or EMA over search batches (authors' semantics)."""
        if self.o.accumulate == "sum":
            xh, by = self._reconstruct(x, r, lo, hi, outliers, token_scale)
            return self._lp(x, xh, w), by
        ema, by_total = None, torch.zeros(x.shape[1])
        for a in range(0, x.shape[0], self.o.search_batch_rows):
            sl = slice(a, a + self.o.search_batch_rows)
            ts = token_scale[sl] if token_scale is not None else None
            xh, by = self._reconstruct(x[sl], r, lo, hi, outliers, ts)
            wb = w[sl] / w[sl].sum().clamp(min=1e-30)
            val = self._lp(x[sl], xh, wb)
            ema = val if ema is None else self.o.ema_momentum * ema + (1 - self.o.ema_momentum) * val
            by_total += by
        return ema, by_total

    def search(self, x: torch.Tensor, w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
               outliers: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Per-channel ratio ``r_c`` (1 where not searched) and figures for the report."""
        n, c = x.shape
        grid = self.o.grid()
        rounds = 3 if self.dynamic else 1
        r = torch.ones(c)
        token_scale = None
        info: dict = {}
        for _ in range(rounds):
            if self.dynamic:   # per-token scales from the current clip, held fixed inside one round
                xc = torch.maximum(torch.minimum(x, r * torch.maximum(lo.abs(), hi.abs())),
                                   -r * torch.maximum(lo.abs(), hi.abs()))
                token_scale, _ = range_qparams(xc.amin(-1, keepdim=True), xc.amax(-1, keepdim=True), self.spec)
            lp = torch.empty(len(grid), c)
            by = torch.empty(len(grid), c)
            for j, rj in enumerate(grid):
                lp[j], by[j] = self._batched_lp(x, torch.full((c,), float(rj)), lo, hi, outliers, w, token_scale)
            if self.o.dabc == "sparse" and self.o.budget is not None:
                # each outlier channel may bypass at most its share of the layer's element budget
                k_out = max(int(outliers.sum()), 1)
                cap = self.o.budget * n * c / k_out
                lp = torch.where(by > cap, torch.full_like(lp, float("inf")), lp)
            choice = lp.argmin(0)
            if self.o.dabc == "sparse":
                # a channel with no feasible candidate keeps the full range
                none_ok = torch.isinf(lp).all(0)
                choice = torch.where(none_ok, torch.full_like(choice, len(grid) - 1), choice)
            if self.o.lambda_cos > 0 and self.o.cos_sweeps > 0:
                choice = self._cosine_sweeps(x, w, grid, choice, lp, lo, hi, outliers, token_scale)
            r = grid[choice].clone()
            if self.o.dabc == "dense" and not self.dynamic:
                r[outliers] = 1.0
        if self.o.refine == "golden":
            r = self._golden(x, w, grid, r, lo, hi, outliers, token_scale)
        info["ratio_mean"] = float(r[~outliers].mean()) if bool((~outliers).any()) else 1.0
        info["ratio_at_floor"] = float((r[~outliers] <= grid[0] + 1e-6).float().mean()) if bool(
            (~outliers).any()) else 0.0
        return r, info

    def _cosine_sweeps(self, x, w, grid, choice, lp, lo, hi, outliers, token_scale):
        """Jacobi sweeps on L_p/C + λ·L_cos with the exact per-token cosine change of single-channel moves.

        The grid candidates x̂_j are built once and held when they fit in ``SWEEP_CANDIDATE_BYTES``; otherwise
        (Qwen2.5-0.5B's down_proj: 20 × 4096 × 4864 × 4 B = 1.6 GB) each is rebuilt when a sweep needs it — the
        same values, so the same choice, for one reconstruction more per candidate and sweep.
        """
        n, c = x.shape
        nx = x.norm(dim=1).clamp(min=1e-12).reshape(-1, 1)
        wc = w.reshape(-1, 1)

        def candidate(rj):
            return self._reconstruct(x, torch.full((c,), float(rj)), lo, hi, outliers, token_scale)[0]

        held = [candidate(rj) for rj in grid] if 4 * n * c * len(grid) <= SWEEP_CANDIDATE_BYTES else None
        buf_a, buf_b = torch.empty_like(x), torch.empty_like(x)
        for _ in range(self.o.cos_sweeps):
            # the current reconstruction, channel c at its chosen ratio (reconstruction is per element)
            cur = self._reconstruct(x, grid[choice], lo, hi, outliers, token_scale)[0]
            dot = (x * cur).sum(1, keepdim=True)
            cur2 = cur * cur
            nq2 = cur2.sum(1, keepdim=True)
            total = torch.empty(len(grid), c)
            for j, rj in enumerate(grid):
                xh_j = held[j] if held is not None else candidate(rj)
                # cos_j = (dot + x (x̂_j − x̂)) / (|x| sqrt(|x̂|² + x̂_j² − x̂²)) per row and channel,
                # evaluated in place in two reused buffers (the big [rows, C] temporaries dominated the time)
                dot_j = torch.sub(xh_j, cur, out=buf_a).mul_(x).add_(dot)
                nq2_j = torch.mul(xh_j, xh_j, out=buf_b).add_(nq2).sub_(cur2).clamp_(min=1e-24)
                cos = dot_j.div_(nq2_j.sqrt_().mul_(nx))
                total[j] = lp[j] / c + self.o.lambda_cos * (1 - cos.mul_(wc).sum(0))
            new = total.argmin(0)
            if torch.equal(new, choice):
                break
            choice = new
        return choice

    def _golden(self, x, w, grid, r, lo, hi, outliers, token_scale):
        """Golden-section search of L_p per channel in [r − Δ, r + Δ] (Δ = grid step), vectorised."""
        step = float(grid[1] - grid[0]) if len(grid) > 1 else 0.05
        a = (r - step).clamp(min=1e-3)
        b = (r + step).clamp(max=1.0)
        g = (math.sqrt(5) - 1) / 2
        for _ in range(self.o.refine_steps):
            c1, c2 = b - g * (b - a), a + g * (b - a)
            f1 = self._batched_lp(x, c1, lo, hi, outliers, w, token_scale)[0]
            f2 = self._batched_lp(x, c2, lo, hi, outliers, w, token_scale)[0]
            left = f1 <= f2
            b = torch.where(left, c2, b)
            a = torch.where(left, a, c1)
        new = (a + b) / 2
        keep = self._batched_lp(x, r, lo, hi, outliers, w, token_scale)[0] <= \
            self._batched_lp(x, new, lo, hi, outliers, w, token_scale)[0]
        out = torch.where(keep, r, new)
        if self.o.dabc == "dense" and not self.dynamic:
            out[outliers] = 1.0
        return out


# ------------------------------------------------------------------------------------------------ method

@register
class MorphoQuant(Method):
    name = "morpho"
    Options = MorphoOptions
    needs_inputs = True

    @property
    def needs_global_stats(self) -> bool:  # type: ignore[override]
        return "global" in self.options.thresholds

    def transform(self, model, stacks) -> dict:
        """Online Hadamard on the inputs of the linears named by ``online_hadamard`` (option docstring)."""
        suffixes = tuple(self.options.online_hadamard)
        if not suffixes:
            return {}
        wrapped, kinds = 0, set()
        for stack in stacks:
            for block in stack.blocks:
                for name, lin in list(block.named_modules()):
                    if name.endswith(suffixes) and type(lin) is nn.Linear:
                        new, kind = online_hadamard_linear(lin, seed=0, max_block=self.options.hadamard_max_block)
                        block.set_submodule(name, new)
                        wrapped, kinds = wrapped + 1, kinds | {kind}
        if not wrapped:
            raise ValueError(f"online_hadamard {list(suffixes)}: no nn.Linear of the quantized stacks ends with "
                             f"these names; use the names of the model's linears (e.g. down_proj, fc2)")
        return {"online_hadamard": {"linears": wrapped, "factors": sorted(kinds)}}

    def prepare(self, model, stacks, global_stats) -> dict:
        if global_stats is None:
            return {}
        # one network-wide threshold per stack (towers and decoder have unrelated scales)
        out = {}
        for stack in stacks:
            sub = {k: v for k, v in global_stats.items() if k.startswith(stack.name + ".")}
            if sub:
                out[stack.name] = global_threshold(sub, self.options.k)
        return {"global_threshold": out}

    def quantize_linear(self, ctx: BlockContext, name: str, linear: nn.Linear) -> QuantLinear:
        o = self.options
        act = ctx.act
        if act is None:
            raise ValueError("the morpho method quantizes activations: set activations.bits to 2..8")
        stats: ModalityStats = ctx.stats[name]
        gthr: Threshold | None = ctx.global_state.get("global_threshold", {}).get(ctx.stack) \
            if "global" in o.thresholds else None
        mask, scores, detail = modality_outlier_mask(stats, o.k, gthr, o.per_modality_outliers)
        if o.thresholds == "global":
            mask = scores > gthr.value if gthr is not None else torch.zeros_like(mask)
        if o.down_proj_all_outliers and name.endswith("down_proj"):
            mask = torch.ones_like(mask)
        c = linear.in_features
        if o.dabc == "dense" and o.budget is not None and int(mask.sum()) > o.budget * c:
            keep = max(int(o.budget * c), 0)
            top = torch.topk(torch.where(mask, scores, torch.full_like(scores, -math.inf)), keep).indices
            mask = torch.zeros_like(mask)
            mask[top] = True
        if o.dabc == "none":
            mask = torch.zeros_like(mask)
        x = ctx.sampler.rows(name)
        ids = ctx.sampler.ids(name)
        w = row_weights(ids, x.shape[0], o.modality_weighting)
        st = stats.all
        lo, hi = base_interval(st.min, st.max, mask, o.base_interval)
        dynamic = act.dynamic
        search = ClipSearch(o, act.spec, dynamic)
        r = torch.ones(c)
        info = {}
        if o.clip_search:
            r, info = search.search(x, w, lo, hi, mask)
        lo_c, hi_c = r * lo, r * hi
        alpha = torch.maximum(lo_c.abs(), hi_c.abs())
        report = {"outlier_channels": int(mask.sum()), "channels": c,
                  "outlier_fraction": float(mask.float().mean()), **info,
                  "local_threshold": detail["local_threshold"], "global_threshold": detail["global_threshold"]}
        report.update({k: v for k, v in detail.items() if k.startswith("outliers_")})
        outlier_idx = mask.nonzero().reshape(-1)
        threshold = o.rho * alpha[outlier_idx] if o.dabc == "sparse" else None
        # per-modality reconstruction loss before / after the search (report only)
        xh0, _ = search._reconstruct(x, torch.ones(c), lo, hi, mask)
        xh1, by = search._reconstruct(x, r, lo, hi, mask)
        report["bypass_element_fraction"] = float(by.sum() / max(x.numel(), 1)) if o.dabc != "none" else 0.0
        report["effective_bits"] = act.spec.bits + 16 * (report["outlier_fraction"] if o.dabc == "dense"
                                                         else report["bypass_element_fraction"])
        report["loss_by_modality"] = _loss_by_modality(x, xh0, xh1, ids, o.p)
        ctx.report[name] = report
        ctx.arrays[name] = {"dispersion": scores, "outlier_mask": mask.to(torch.uint8), "clip_ratio": r,
                            "alpha": alpha}
        if dynamic:
            clip = alpha.clone()
            if o.dabc != "none" and outlier_idx.numel():
                # outlier channels are recovered by DABC: clip them to the compliant channels' level
                clip[outlier_idx] = alpha[~mask].max() if bool((~mask).any()) else clip[outlier_idx]
            t = None
            if o.modality_ranges:
                t, tinfo = search_modality_scales(x, ids, -clip, clip, mask, o, act.spec, True)
                report.update(tinfo)
            return _quant_linear(linear, ctx.weight_spec, act, act_clip=clip, outlier_idx=outlier_idx,
                                 dabc=o.dabc, outlier_threshold=threshold,
                                 weight_quantizer=ctx.weight_quantizer(name), modality_scale=t)
        if o.dabc == "dense" and o.outlier_scale != "own" and outlier_idx.numel() and bool((~mask).any()):
            s, _ = range_qparams(lo_c, hi_c, act.spec)
            if o.outlier_scale == "median":
                target = s[~mask].median().expand(outlier_idx.numel())
            else:
                m2 = (st.sum_sq / max(st.count, 1)).float()
                target = search_outlier_scales(linear.weight.detach().float(), s, outlier_idx, m2,
                                               ctx.weight_spec, o.outlier_scale_points)[outlier_idx]
            ratio = target / s[outlier_idx]
            lo_c, hi_c = lo_c.clone(), hi_c.clone()
            lo_c[outlier_idx] *= ratio
            hi_c[outlier_idx] *= ratio
        t = None
        if o.modality_ranges:
            t, tinfo = search_modality_scales(x, ids, lo_c, hi_c, mask, o, act.spec, False)
            report.update(tinfo)
        return _quant_linear(linear, ctx.weight_spec, act, act_range=(lo_c, hi_c),
                             outlier_idx=outlier_idx, dabc=o.dabc, outlier_threshold=threshold,
                             weight_quantizer=ctx.weight_quantizer(name), modality_scale=t)


def _quant_linear(linear: nn.Linear, *args, **kwargs) -> QuantLinear:
    """``QuantLinear.from_linear``, or its online-Hadamard variant for a linear wrapped by ``transform``."""
    if isinstance(linear, HadamardLinear):
        return quantize_online(linear, HadamardQuantLinear, *args, **kwargs)
    return QuantLinear.from_linear(linear, *args, **kwargs)


def _loss_by_modality(x, xh0, xh1, ids, p) -> dict:
    out = {}
    for label, sel in [("all", torch.ones(x.shape[0], dtype=torch.bool))] + \
            [(m.label, ids.long() == int(m)) for m in Modality]:
        if bool(sel.any()):
            out[label] = {"before": float((x[sel] - xh0[sel]).abs().pow(p).mean()),
                          "after": float((x[sel] - xh1[sel]).abs().pow(p).mean())}
    return out

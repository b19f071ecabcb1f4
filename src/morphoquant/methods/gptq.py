"""GPTQ: Hessian-aware weight rounding (Frantar et al., 2023), as a weight quantizer and as a method.

For one linear layer with inputs ``X ∈ R^{N×C}`` and ``H = (2/N) XᵀX`` (the Hessian of the layer-output error
``‖X Wᵀ − X Ŵᵀ‖²`` w.r.t. one weight row), GPTQ quantizes the columns of ``W ∈ R^{O×C}`` one at a time and
spreads each column's rounding error over the columns not yet quantized (Optimal Brain Surgeon update):

    q_j = Q(w_j),      e_j = (w_j − q_j) / U_jj,      w_k ← w_k − e_j · U_jk      (k > j, all rows at once)

where ``U`` is the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = Uᵀ U``), computed once:

* **damping**: ``H ← H + λ·mean(diag H)·I`` (``λ = damp``), retried with 10× more if Cholesky fails;
* **dead columns** (``H_jj = 0``: the input channel was always zero): ``H_jj ← 1`` and ``W_{:,j} ← 0`` (their
  weight never matters, zero is exact);
* **act-order**: columns are visited in order of decreasing ``H_jj`` (most sensitive first) — ``H`` and ``W`` are
  permuted, the codes are un-permuted at the end;
* **lazy blocks**: the update of columns beyond the current block of ``block_size`` columns is accumulated and
  applied once per block as ``W_{:,>b} −= E_b · U_{b,>b}`` (same result, cache-friendly);
* **groups**: a group's scale/zero point is computed from the *current* (error-updated) weights of that group
  when the first of its columns is reached. Groups are always the **natural** groups of ``group_size``
  consecutive input channels ("static groups"), also under act-order, so the result is an ordinary
  group-quantized tensor (same layout as round-to-nearest); with act-order, the columns of a group not yet
  reached are evaluated exactly, pending block updates included. Per-channel scales are computed from the
  initial rows, per-tensor from the whole matrix.

Scales follow :func:`morphoquant.numerics.range_qparams` (min/max, fp32), so the only difference from RTN is the
rounding. Code books (NF4/FP4) work the same way (nearest level instead of round).

The ``gptq`` method = GPTQ weights + the recipe's activation quantizer (round to nearest), i.e. the same as
recipe ``method: rtn`` with ``weight_method: gptq``. When the pipeline already bound Hessian quantizers
(``weight_method: gptq``) they are used as they are (the recipe's ``gptq:`` arguments then apply); otherwise
the method collects each linear's Hessian itself with one extra pass of the block over the calibration set.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..layers import QuantLinear
from ..numerics import QuantizedTensor, QuantSpec, dequantize, quantize, range_qparams
from ..statistics.collector import ActivationCollector, HessianObserver
from .base import BlockContext, Method, MethodOptions, register

__all__ = ["GPTQ", "GPTQOptions", "folded_hessian", "gptq_quantize", "hessian_of", "inverse_hessian_factor"]


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    """``H = (2/N) XᵀX`` of rows ``x[N, C]`` (fp32; accumulated in fp64)."""
    x = x.reshape(-1, x.shape[-1]).double()
    return (2.0 * x.T @ x / max(x.shape[0], 1)).float()


def inverse_hessian_factor(h: torch.Tensor, damp: float, max_tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λ mean(diag H) I)⁻¹`` (fp64), raising λ ×10 when not positive
    definite."""
    h = h.double()
    c = h.shape[0]
    mean_diag = float(torch.diagonal(h).mean()) or 1.0
    lam = damp
    for _ in range(max_tries):
        hd = h + lam * mean_diag * torch.eye(c, dtype=h.dtype)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u
        lam *= 10.0
    raise FloatingPointError(f"GPTQ: the Hessian is not positive definite even with damping {lam / 10:g}·mean(diag); "
                             "the calibration inputs of this layer are degenerate")


def _qparams(block: torch.Tensor, spec: QuantSpec, per_tensor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) ``[O]`` for the columns ``block[O, k]`` (one range per row, or one for all)."""
    if per_tensor:
        s, z = range_qparams(block.min(), block.max(), spec)
        return s.expand(block.shape[0]).clone(), z.expand(block.shape[0]).clone()
    s, z = range_qparams(block.amin(1), block.amax(1), spec)
    return s, z


def _quant_column(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: QuantSpec):
    """codes (as fp32) and dequantized values of one column ``w[O]`` with per-row ``s, z``."""
    if spec.fmt == "int":
        q = torch.clamp(torch.round(w / s) + z, spec.qmin, spec.qmax)
        return q, (q - z) * s
    q = quantize(w.reshape(-1, 1), s.reshape(-1, 1), z.reshape(-1, 1), spec)
    return q.reshape(-1).float(), dequantize(q, s.reshape(-1, 1), z.reshape(-1, 1), spec).reshape(-1)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = True) -> QuantizedTensor:
    """GPTQ-round ``weight[O, C]`` given ``hessian[C, C]`` (module docstring). Returns a
    :class:`QuantizedTensor` with the same layout as :func:`morphoquant.numerics.quantize_weight`."""
    if weight.dim() != 2:
        raise ValueError(f"weights must be 2-D [out, in], got shape {tuple(weight.shape)}")
    o, c = weight.shape
    if hessian.shape != (c, c):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match {c} input channels")
    if spec.granularity == "token":
        raise ValueError("granularity 'token' is for activations")
    if not torch.isfinite(hessian).all():
        raise FloatingPointError("GPTQ: the Hessian has NaN/inf entries")
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) <= 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    if bool(dead.all()):
        h = torch.eye(c, dtype=torch.float64)

    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(c)
    inv_perm = torch.argsort(perm)
    w = w[:, perm]
    h = h[perm][:, perm]
    u = inverse_hessian_factor(h, damp)

    # natural groups: group id of every permuted position, and the natural columns of every group
    g = spec.group_size if spec.granularity == "group" else c
    n_groups = -(-c // g)
    group_of = (perm // g) if spec.granularity == "group" else torch.zeros(c, dtype=torch.long)
    per_tensor = spec.granularity == "tensor"
    scale = torch.zeros(o, n_groups)
    zero = torch.zeros(o, n_groups)
    ready = [False] * n_groups
    if spec.granularity in ("channel", "tensor"):
        s, z = _qparams(w.float(), spec, per_tensor)
        scale[:, 0], zero[:, 0] = s, z
        ready[0] = True

    codes = torch.zeros(o, c)
    wf = w.float()
    uf = u.float()
    for i1 in range(0, c, block_size):
        i2 = min(i1 + block_size, c)
        w1 = wf[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = uf[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            gid = int(group_of[j])
            if not ready[gid]:
                cols = inv_perm[gid * g:min((gid + 1) * g, c)]          # permuted positions of the group
                cur = torch.empty(o, cols.numel())
                inside = cols < i2
                if bool(inside.any()):
                    cur[:, inside] = w1[:, cols[inside] - i1]
                if bool((~inside).any()):
                    out_cols = cols[~inside]
                    cur[:, ~inside] = wf[:, out_cols] - err1[:, :i] @ uf[i1:j, out_cols]
                scale[:, gid], zero[:, gid] = _qparams(cur, spec, per_tensor)
                ready[gid] = True
            col = w1[:, i]
            q, deq = _quant_column(col, scale[:, gid], zero[:, gid], spec)
            codes[:, j] = q
            e = (col - deq) / u1[i, i]
            w1[:, i:] -= e.reshape(-1, 1) * u1[i, i:].reshape(1, -1)
            err1[:, i] = e
        if i2 < c:
            wf[:, i2:] -= err1 @ uf[i1:i2, i2:]

    codes = codes[:, inv_perm].to(spec.code_dtype)
    if spec.granularity == "group":
        sc, zp = scale.reshape(o, n_groups, 1), zero.reshape(o, n_groups, 1)
    elif per_tensor:
        sc, zp = scale[:1, :1].clone(), zero[:1, :1].clone()
    else:
        sc, zp = scale[:, :1].clone(), zero[:, :1].clone()
    return QuantizedTensor(codes, sc.float(), zp.float(), spec)


# ------------------------------------------------------------------------------------------------ method

class GPTQOptions(MethodOptions):
    damp: float = Field(0.01, gt=0)
    """Dampening added to the Hessian diagonal, as a fraction of its mean."""
    block_size: int = Field(128, ge=1)
    """Columns per lazy-update block."""
    act_order: bool = True
    """Visit columns by decreasing Hessian diagonal (groups stay the natural ones)."""


@register
class GPTQ(Method):
    """GPTQ weights + round-to-nearest activations (module docstring)."""

    name = "gptq"
    Options = GPTQOptions

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantLinear]:
        quantizers = {n: ctx.weight_quantizer(n) for n in ctx.linears}
        missing = [n for n, q in quantizers.items() if q is None]
        if missing:
            hess = collect_hessians(ctx, {n: ctx.linears[n] for n in missing})
            o = self.options
            for n in missing:
                quantizers[n] = _bound_quantizer(hess[n], ctx.weight_spec, o.damp, o.block_size, o.act_order)
                ctx.report.setdefault(n, {})["hessian"] = "method"
        out = {}
        for n, lin in ctx.linears.items():
            out[n] = QuantLinear.from_linear(lin, ctx.weight_spec, ctx.act, act_range=self.static_range(ctx, n),
                                             weight_quantizer=quantizers[n])
            ctx.report.setdefault(n, {}).setdefault("hessian", "pipeline")
        return out


def _bound_quantizer(h: torch.Tensor, spec: QuantSpec, damp: float, block_size: int, act_order: bool):
    def quantizer(w, fold_scale, perm=None):
        return gptq_quantize(w, folded_hessian(h, fold_scale, perm), spec, damp=damp, block_size=block_size,
                             act_order=act_order)
    return quantizer


def folded_hessian(h: torch.Tensor, fold_scale: torch.Tensor | None, perm: torch.Tensor | None) -> torch.Tensor:
    """The Hessian of the GEMM input a weight quantizer sees: ``H`` of ``x`` in the natural channel order,
    ``P H Pᵀ`` when the layer stores its channels in the order ``perm``, then ``diag(1/s) · diag(1/s)`` for the
    folded input ``x / s`` (``fold_scale`` already in the stored order)."""
    if perm is not None:
        h = h[perm][:, perm]
    if fold_scale is not None:
        h = h / fold_scale.reshape(-1, 1) / fold_scale.reshape(1, -1)
    return h


def collect_hessians(ctx: BlockContext, linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Hessians of ``linears`` from one pass of the (current) block over the calibration set (``ctx.rerun``)."""
    if ctx.rerun is None:
        raise RuntimeError("collecting GPTQ Hessians needs ctx.rerun (run the method inside the pipeline)")
    obs = HessianObserver()
    collector = ActivationCollector(linears, None, [obs])
    with collector:
        ctx.rerun([collector])
    return {n: obs.hessian(n) for n in linears}

"""The reference integer runtime: a ``QuantLinear`` executed with int8 × int8 → int32 GEMMs.

:class:`IntegerLinear` computes, for activation codes ``x_q`` (zero point ``z``), int weight codes ``W_q``
(int4 values unpacked into int8, stored once per weight group in the kernel's layout), weight scales ``s_w``
and an activation scale ``s_x`` (token / tensor; none when per-channel scales are folded into the weight)::

    acc_g = Σ_{c∈g} x_q[n, c]·W_q[o, c] − corr_g          exact integers (int32 kernel)
    y     = s_x · Σ_g s_w[o, g] · acc_g                    fp32, groups added left to right
    y    += r[:, idx] @ W_Q[:, idx]ᵀ                       DABC side product over the outlier channels (fp32)
    y    += b

with ``corr_g`` the zero-point term (per-channel/per-tensor static: a constant row, per token: ``z[n]·rowsum``).
Every floating-point step is the *same* IEEE operation, in the same order, as the fake-quant integer product
``QuantLinear.forward(x, matmul=float_matmul)`` (:func:`morphoquant.numerics.integer_gemm.integer_linear` plus
the DABC side product and the bias), so the output is **bit-identical** to it (tests/runtime check every scheme,
kernel and shape). Caveats: (1) the fake path accumulates the integer products in fp32, exact while partial sums
stay below 2^24 — always for 4-bit × 4-bit; for 8-bit × 8-bit only up to K ≈ 1024 channels per group in the
worst case (random data stays far below); past that the integer runtime (exact int32, rounded once) is the
exact one and the fake path is off by ≤ K·2^-24 relative. (2) A QuantLinear evaluated with a single fp32 GEMM on
the dequantized weight (a faster fake path) sums in another order and agrees only to fp32 rounding (~1e-6).

Speed: activations are quantized with a short chain of vectorised in-place ops; per-channel weights take one
GEMM per layer with the weight scale applied in the kernel's epilogue (exactly ``fl(fl(acc)·s_w)``, probed) when
no zero-point term sits between. Group-wise weights take one GEMM per group for many rows, and for few rows
(decode) a single GEMM over all of K whose activation rows are expanded block-diagonally (row ``(g, n)`` holds
only group ``g``'s codes), which yields every group accumulator at once; the per-group scaling and the
left-to-right group sum follow in fp32.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers import QuantLinear
from ..numerics import range_qparams
from ..numerics.hadamard import hadamard_transform
from ..numerics.integer_gemm import integer_linear, zero_point_correction
from ..statistics.modality import Modality, row_modality_index
from .kernels import AutoKernel, IntKernel, get_kernel, int_mm_matmul, prepare_first

__all__ = ["IntegerLinear", "RuntimeReport", "integer_runtime_support", "to_integer_runtime"]


def integer_runtime_support(q: QuantLinear) -> str | None:
    """``None`` when ``q`` can run on integer kernels, else the reason it cannot."""
    if q.act is None:
        return "weight-only (A16): activations stay in floating point"
    if q.weight_spec.fmt != "int":
        return f"{q.weight_spec.fmt} code-book weights need a look-up-table kernel"
    if not q.integer_weight:
        return "asymmetric weights (non-zero weight zero points)"
    return None


class IntegerLinear(nn.Module):
    """Integer execution of a :class:`QuantLinear` (module docstring). Runtime-only: not saved or trained."""

    def __init__(self, q: QuantLinear, kernel: str | IntKernel = "auto", *, keep_reference: bool = False):
        """``keep_reference`` keeps the int8 codes for :meth:`reference_forward` (tests; costs 1 byte/weight)."""
        super().__init__()
        reason = integer_runtime_support(q)
        if reason:
            raise ValueError(f"cannot run this QuantLinear on integer kernels: {reason}")
        self.kernel = get_kernel(kernel)
        self.in_features, self.out_features = q.in_features, q.out_features
        # a rotated layer (QuaRot's HadamardQuantLinear) quantizes x H, not x: the rotation stays, in floating point
        self.hadamard = q.hadamard() if callable(getattr(q, "hadamard", None)) else None
        # scale-sorted weight groups: the layer's operands are stored in the order input_perm (QuantLinear)
        self.register_buffer("input_perm", q.input_perm.detach().clone() if q.permuted else None,
                             persistent=False)
        self.act, self.weight_spec, self.dabc = q.act, q.weight_spec, q.dabc
        spec = q.act.spec
        self.qmin, self.qmax = spec.qmin, spec.qmax
        self.off = -spec.qmin if spec.symmetric else 0          # uint8 codes u = x_q + off
        self.symmetric = spec.symmetric
        codes = q.weight_codes
        c = q.in_features
        grouped = q.weight_scale.dim() == 3
        if grouped:
            g = q.weight_spec.group_size
            self.bounds = [(a, min(a + g, c)) for a in range(0, c, g)]
            scales = [q.weight_scale[:, i, 0].contiguous() for i in range(len(self.bounds))]
        else:
            self.bounds = [(0, c)]
            scales = [q.weight_scale.reshape(-1).contiguous()]
        self.scales = scales
        # zero-point corrections (identical to integer_linear's, precomputed where they are constants)
        self.zp_mode = None
        self.corr: list[torch.Tensor] = []
        if not spec.symmetric:
            if not q.act.dynamic:
                self.zp_mode = "const"
                self.corr = [zero_point_correction(q.act_zero, codes, a, b) for a, b in self.bounds]
            else:
                self.zp_mode = "token"
                self.corr = [codes[:, a:b].float().sum(1).reshape(1, -1) for a, b in self.bounds]
        # with no zero-point term between the GEMM and the weight scale, the kernel applies the scale itself
        auto = isinstance(self.kernel, AutoKernel)
        large = self.kernel.large_kernels if auto else [self.kernel]
        small = self.kernel.small_kernels if auto else [self.kernel]
        n_groups = len(self.bounds)
        if n_groups == 1:
            self.handles = [(self.kernel, self.kernel.prepare(codes.contiguous(), spec.bits,
                                                              self.scales[0] if self.zp_mode is None else None))]
            self.full = None
        else:
            self.handles = [prepare_first(large, codes[:, a:b].contiguous(), spec.bits,
                                          self.scales[i] if self.zp_mode is None else None)
                            for i, (a, b) in enumerate(self.bounds)]
            # few rows: ONE GEMM over all of K with the activation rows expanded block-diagonally per group
            # (row (g, n) keeps only group g's codes, zeros elsewhere) -> every group's accumulator at once
            self.full = prepare_first(small, codes.contiguous(), spec.bits, None)
            mask = torch.zeros(n_groups, 1, c)
            for i, (a, b) in enumerate(self.bounds):
                mask[i, :, a:b] = 1
            self.register_buffer("group_mask", mask, persistent=False)
            self.register_buffer("group_scales", torch.stack(self.scales).unsqueeze(1), persistent=False)
            if self.corr:
                self.register_buffer("group_corr", torch.stack([t.reshape(-1) for t in self.corr]).unsqueeze(1),
                                     persistent=False)
        self.register_buffer("act_scale", q.act_scale.detach().clone(), persistent=False)
        self.register_buffer("act_zero", q.act_zero.detach().clone(), persistent=False)
        self.register_buffer("act_clip", q.act_clip.detach().clone(), persistent=False)
        self.has_clip = bool(torch.isfinite(q.act_clip).any())
        self.register_buffer("modality_scale", q.modality_scale.detach().clone(), persistent=False)
        self.register_buffer("bias", None if q.bias is None else q.bias.detach().clone(), persistent=False)
        self.has_dabc = q.dabc != "none" and q.outlier_idx.numel() > 0
        idx = q.outlier_idx.detach().clone()
        self.register_buffer("outlier_idx", idx, persistent=False)
        self.register_buffer("outlier_threshold", q.outlier_threshold.detach().clone(), persistent=False)
        self.register_buffer("w_side", self._side_weight(q) if self.has_dabc else None, persistent=False)
        # reference operands for integer_linear(..., matmul=int_mm)
        self._ref = (codes, q.weight_scale, q.weight_spec.group_size) if keep_reference else None

    @staticmethod
    def _side_weight(q: QuantLinear) -> torch.Tensor:
        """``W_Q[:, idx]`` (the dequantized weight's outlier columns) without materialising the full weight:
        element for element the same ``(q − z)·s`` as :func:`morphoquant.numerics.dequantize`."""
        idx = q.outlier_idx
        codes = q.weight_codes[:, idx].float()
        if q.weight_scale.dim() == 3:
            gi = idx // q.weight_spec.group_size
            s, z = q.weight_scale[:, gi, 0], q.weight_zero[:, gi, 0]
        else:
            s, z = q.weight_scale, q.weight_zero
        return ((codes - z) * s).contiguous()

    @property
    def modality_dependent(self) -> bool:
        return self.modality_scale.numel() > 0

    # ------------------------------------------------------------------ activation quantization
    def _quantize(self, x: torch.Tensor):
        """→ (float integer codes x_q, zero point or None, row scale or None, DABC residual or None)."""
        act = self.act
        idx = self.outlier_idx if self.has_dabc else None
        rows = None          # per-modality range multiplier of each row (QuantLinear docstring)
        if self.modality_scale.numel():
            rows = self.modality_scale[row_modality_index(x.shape[0], len(Modality))].reshape(-1, 1)
        if act.dynamic:
            clip = self.act_clip if rows is None else self.act_clip * rows
            xc = torch.maximum(torch.minimum(x, clip), -clip) if self.has_clip else x
            lo, hi = xc.amin(-1, keepdim=True), xc.amax(-1, keepdim=True)     # (aminmax is ~10x slower)
            s, z = range_qparams(lo, hi, act.spec)
            t = xc / s
            base = x[:, idx] if idx is not None else None
        elif act.folded:
            s, z = self.act_scale, self.act_zero
            t = x / s if rows is None else x / (s * rows)
            base = t[:, idx] if idx is not None else None          # u = x / s on the outlier channels
        else:
            s, z = self.act_scale, self.act_zero
            t = x / s
            base = x[:, idx] if idx is not None else None
        t.round_()
        if not self.symmetric:
            t.add_(z)
        t.clamp_(self.qmin, self.qmax)
        resid = None
        if idx is not None:
            q_idx = t[:, idx]
            if act.folded:
                resid = base - (q_idx - z[idx])
                if rows is not None:
                    resid = resid * rows
            else:
                resid = base - s * (q_idx - z)
            if self.dabc == "sparse":
                resid = resid * (x[:, idx].abs() > self.outlier_threshold)
        x_zero = None if self.symmetric else z
        x_scale = rows if act.folded else s
        return t, x_zero, x_scale, resid

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = self._rotated(x.reshape(-1, shape[-1]).float())
        codes, x_zero, x_scale, resid = self._quantize(x2)
        single = len(self.bounds) == 1
        if not single and codes.shape[0] * len(self.bounds) <= self.blockdiag_rows:
            y = self._grouped_few_rows(codes, x_zero)
        else:
            y = self._grouped_loop(codes, x_zero, single)
        if x_scale is not None:
            y.mul_(x_scale.reshape(-1, 1) if x_scale.numel() > 1 else x_scale.reshape(()))
        if resid is not None:
            y.add_(resid @ self.w_side.T)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], -1).to(x.dtype)

    #: use the block-diagonal single GEMM while (rows × groups) stays at most this
    blockdiag_rows = 64

    def _grouped_few_rows(self, codes: torch.Tensor, x_zero: torch.Tensor | None) -> torch.Tensor:
        n_groups, m = len(self.bounds), codes.shape[0]
        kern, h = self.full
        expanded = (codes.unsqueeze(0) * self.group_mask).reshape(n_groups * m, -1)     # zeros: code 0
        acc = kern.matmul(expanded, self.off, h).reshape(n_groups, m, -1)               # acc_g, exact
        if self.zp_mode == "const":
            acc.sub_(self.group_corr)
        elif self.zp_mode == "token":
            acc.sub_(x_zero.float().reshape(1, -1, 1) * self.group_corr)
        parts = acc.mul_(self.group_scales)
        y = parts[0]
        for i in range(1, n_groups):                     # left to right, as integer_linear sums the groups
            y.add_(parts[i])
        return y

    def _grouped_loop(self, codes: torch.Tensor, x_zero: torch.Tensor | None, single: bool) -> torch.Tensor:
        y = None
        for i, (a, b) in enumerate(self.bounds):
            cg = codes if single else codes[:, a:b]
            kern, h = self.handles[i]
            if self.zp_mode is None:
                part = kern.matmul(cg, self.off, h)          # fl(fl(acc) * s_w)
            else:
                acc = kern.matmul(cg, self.off, h)
                if self.zp_mode == "const":
                    acc.sub_(self.corr[i])
                elif self.zp_mode == "token":
                    if x_zero.numel() == 1:
                        acc.sub_(self.corr[i] * x_zero.float().reshape(()))
                    else:
                        acc.sub_(x_zero.float().reshape(-1, 1) * self.corr[i])
                part = acc.mul_(self.scales[i])
            y = part if y is None else y.add_(part)
        return y

    def _rotated(self, x2: torch.Tensor) -> torch.Tensor:
        """The GEMM's input: ``x H`` for an online-rotated layer, gathered into the stored channel order."""
        if self.hadamard is not None:
            x2 = hadamard_transform(x2, self.hadamard)
        return x2 if self.input_perm is None else x2[:, self.input_perm]

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same output through :func:`integer_linear` with ``matmul`` = ``torch._int_mm`` (slow, simple)."""
        if self._ref is None:
            raise RuntimeError("build the IntegerLinear with keep_reference=True to use reference_forward")
        shape = x.shape
        x2 = self._rotated(x.reshape(-1, shape[-1]).float())
        x_q, x_zero, x_scale, resid = self._quantize(x2)
        codes, w_scale, gs = self._ref
        y = integer_linear(x_q, codes, w_scale, x_zero=x_zero, x_scale=x_scale, group_size=gs, bias=None,
                           matmul=int_mm_matmul)
        if resid is not None:
            y = y + resid @ self.w_side.T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1).to(x.dtype)

    def extra_repr(self) -> str:
        a = self.act.spec
        return (f"in={self.in_features}, out={self.out_features}, W{self.weight_spec.bits}"
                f"-{self.weight_spec.granularity}{self.weight_spec.group_size or ''}, A{a.bits}-{a.granularity}"
                f"{'-sym' if a.symmetric else '-asym'}, groups={len(self.bounds)}, kernel={self.kernel.name}"
                + (f", dabc={self.dabc}[{self.outlier_idx.numel()}]" if self.has_dabc else "")
                + (", online_hadamard" if self.hadamard is not None else ""))


class RuntimeReport(dict):
    """``{"converted": [names], "skipped": {name: reason}, "kernel": name}``."""


def to_integer_runtime(model: nn.Module, kernel: str | IntKernel = "auto", *, strict: bool = False
                       ) -> RuntimeReport:
    """Replace every integer-runnable ``QuantLinear`` of ``model`` by an :class:`IntegerLinear` (in place).

    Weight-only, code-book and asymmetric-weight layers keep their ``QuantLinear`` (reported under
    ``skipped``; ``strict=True`` makes them an error).
    """
    kern = get_kernel(kernel)
    rep = RuntimeReport(converted=[], skipped={}, kernel=kern.name)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, QuantLinear):
            continue
        reason = integer_runtime_support(mod)
        if reason:
            if strict:
                raise ValueError(f"{name}: {reason}")
            rep["skipped"][name] = reason
            continue
        model.set_submodule(name, IntegerLinear(mod, kern))
        rep["converted"].append(name)
    return rep

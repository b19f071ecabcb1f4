"""A linear layer that computes exactly what an integer W-bit × A-bit kernel computes.

Let ``x ∈ R^C`` be one token, ``W ∈ R^{O×C}``, ``b ∈ R^O``.

**Activation quantizer** (one of)

* dynamic per-token (symmetric or not): ``s_t, z_t`` from the token's own range after the optional per-channel
  clip ``x ← clamp(x, −α_c, α_c)``; ``x_q = clamp(round(x / s_t) + z_t)``;
* static per-tensor: one calibrated ``s, z``;
* static per-input-channel ``s_c, z_c`` (the paper's quantizer). These scales sit on the reduction axis, so an
  integer kernel cannot apply them after the GEMM: they are folded into the weight **before** it is quantized,
  ``W' = W · diag(s)``, ``W'_q = Q_w(W')`` and ``x_q = clamp(round(x / s) + z)``. Then

      y = W'_q (x_q − z) + b = W'_q x_q − W'_q z + b,

  i.e. the zero points become the output bias term ``−W'_q z`` (method.md §3 defect 6).

The product itself is :func:`morphoquant.numerics.integer_gemm.integer_linear`, shared with the runtime.

**DABC** (Eq. 7 of the paper), ``Y = W_Q X_Q + b + W_Q((X − X_Q) ⊙ M)``: for the outlier channels ``idx`` the
quantization residual ``r = x/s − (x_q − z)`` (in the units of the folded weight; ``x − s_t (x_q − z_t)``
for per-token) is multiplied by the *same* quantized weight columns in 16/32-bit: a thin side product over
``K = |idx|`` channels. ``dense`` (the paper) keeps the residual of every element of those channels;
``sparse`` (the authors' code) only of elements with ``|x| > threshold_c``.

**Per-modality ranges** (optional ``modality_scale`` ``t ∈ R^{M+1}``, one entry per modality then the pooled
fallback): a token row of modality ``m`` uses the range ``t_m`` times the layer's range — static per-channel
``x_q = clamp(round(x / (t_m s)) + z)`` with ``y = t_m · W'_q (x_q − z) + b`` (a per-row scale in the GEMM epilogue,
like a per-token scale, so one folded weight still serves every modality); dynamic per-token: the clip becomes
``±t_m α_c``. The row modalities come from :func:`morphoquant.statistics.modality_context`.

**Scale-sorted weight groups** (``weight_spec.group_order == "act_scale"`` with static per-channel scales): with
``π = argsort(s)`` the layer computes ``y = W'_q[:, π] x_q[π]`` — the same sum over the reduction axis in another
order — and stores every per-input-channel quantity in the order ``π`` (``weight_codes`` columns, ``act_scale``,
``act_zero``, ``act_clip``; ``outlier_idx`` holds permuted positions), so the weight groups of ``group_size``
consecutive stored columns hold channels of like scale. ``input_perm`` = ``π`` (empty: identity); the forward
gathers ``x[:, π]`` first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..numerics import QuantSpec, quantize_to_float, quantize_weight, range_qparams
from ..numerics.integer_gemm import integer_linear
from ..numerics.quantizers import MIN_SCALE
from ..statistics.modality import Modality, row_modality_index


@dataclass(frozen=True)
class ActivationConfig:
    """Input-activation quantizer: ``spec.granularity`` ∈ {token, tensor, channel}; token implies dynamic."""

    spec: QuantSpec
    dynamic: bool = True

    def __post_init__(self):
        g = self.spec.granularity
        if g == "group":
            raise ValueError("activation granularity 'group' is not supported; use token, tensor or channel")
        if self.spec.fmt != "int":
            raise ValueError("activations use the integer format")
        if g == "token" and not self.dynamic:
            raise ValueError("per-token activation scales are dynamic by definition: set dynamic=true")
        if g == "channel" and self.dynamic:
            raise ValueError("per-input-channel activation scales must be static (calibrated): set dynamic=false")

    @property
    def folded(self) -> bool:
        return self.spec.granularity == "channel"


class QuantLinear(nn.Module):
    """Quantized replacement of ``nn.Linear`` (module docstring has the equations).

    Buffers (all saved in the state dict): ``weight_codes`` (integer codes of W or of the folded W'),
    ``weight_scale``, ``weight_zero``, ``act_scale``/``act_zero`` (static quantizers), ``act_clip`` (per-channel
    clip α before dynamic per-token scaling; +inf = none), ``outlier_idx`` and ``outlier_threshold`` (DABC),
    ``input_perm`` (the stored order of the input channels; empty = natural).
    """

    def __init__(self, in_features: int, out_features: int, weight_spec: QuantSpec,
                 act: ActivationConfig | None, bias: bool, dabc: str = "none"):
        super().__init__()
        if dabc not in ("none", "dense", "sparse"):
            raise ValueError(f"dabc must be none, dense or sparse, got {dabc!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.act, self.dabc = weight_spec, act, dabc
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=weight_spec.code_dtype))
        self.register_buffer("weight_scale", torch.ones(1, 1))
        self.register_buffer("weight_zero", torch.zeros(1, 1))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("act_scale", torch.ones(1))
        self.register_buffer("act_zero", torch.zeros(1))
        self.register_buffer("act_clip", torch.full((in_features,), float("inf")))
        self.register_buffer("outlier_idx", torch.zeros(0, dtype=torch.long))
        self.register_buffer("outlier_threshold", torch.zeros(0))
        self.register_buffer("modality_scale", torch.zeros(0))
        self.register_buffer("input_perm", torch.zeros(0, dtype=torch.long))
        self._w_deq: torch.Tensor | None = None
        # running counters of the 16-bit path (for the effective-bits report)
        self.bypass_elements = 0
        self.total_elements = 0
        self.track_bypass = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_spec: QuantSpec, act: ActivationConfig | None, *,
                    act_range: tuple[torch.Tensor, torch.Tensor] | None = None,
                    act_clip: torch.Tensor | None = None,
                    outlier_idx: torch.Tensor | None = None, dabc: str = "none",
                    outlier_threshold: torch.Tensor | None = None,
                    weight: torch.Tensor | None = None,
                    weight_quantizer=None,
                    modality_scale: torch.Tensor | None = None) -> QuantLinear:
        """Quantize ``linear``.

        ``act_range``: calibrated ``(lo, hi)`` for static quantizers (per channel: ``[C]`` each).
        ``weight``: an already-processed fp32 weight to quantize instead of ``linear.weight`` (e.g. smoothed).
        ``weight_quantizer``: ``(W'[O,C], fold_scale[C] | None) -> QuantizedTensor`` replacing RTN (GPTQ plugs
        in here); it receives the *folded* weight ``W' = W·diag(s)`` and ``s`` when activation scales are per
        channel (so a Hessian of ``x`` becomes ``diag(1/s) H diag(1/s)``), else ``W`` and ``None``.
        ``modality_scale``: per-modality range multipliers ``[M+1]`` (module docstring).
        """
        w = (linear.weight if weight is None else weight).detach().float()
        q = cls(linear.in_features, linear.out_features, weight_spec, act, linear.bias is not None, dabc)
        if linear.bias is not None:
            q.bias = linear.bias.detach().float().clone()
        if act is not None and not act.dynamic:
            if act_range is None:
                raise ValueError("a static activation quantizer needs a calibrated act_range (lo, hi)")
            lo, hi = (t.detach().float() for t in act_range)
            s, z = range_qparams(lo, hi, act.spec)
            q.act_scale, q.act_zero = s.reshape(-1), z.reshape(-1)
            if act.folded:
                if q.act_scale.numel() != linear.in_features:
                    raise ValueError(f"per-channel act_range needs {linear.in_features} entries, got "
                                     f"{q.act_scale.numel()}")
                w = w * q.act_scale.reshape(1, -1)
        if act_clip is not None:
            q.act_clip = act_clip.detach().float().reshape(-1).clone()
        if outlier_idx is not None:
            q.outlier_idx = outlier_idx.detach().long().reshape(-1).clone()
            if dabc == "sparse":
                if outlier_threshold is None:
                    raise ValueError("sparse DABC needs a per-outlier-channel threshold")
                q.outlier_threshold = outlier_threshold.detach().float().reshape(-1).clone()
        if modality_scale is not None:
            q.set_modality_scale(modality_scale)
        fold = q.act_scale if (act is not None and act.folded) else None
        perm = None
        if weight_spec.group_order == "act_scale" and fold is not None:
            perm = torch.argsort(fold, stable=True)
            q._permute_inputs(perm)
            w, fold = w[:, perm], q.act_scale
        if weight_quantizer is None:
            qt = quantize_weight(w, weight_spec)
        elif perm is None:
            qt = weight_quantizer(w, fold)
        else:       # the quantizer sees the permuted columns; a Hessian-bound one permutes its Hessian
            qt = weight_quantizer(w, fold, perm)
        q.weight_codes, q.weight_scale, q.weight_zero = qt.codes, qt.scale.float(), qt.zero_point.float()
        return q

    def _permute_inputs(self, perm: torch.Tensor) -> None:
        """Store the per-input-channel quantities (static per-channel scales and zero points, clip) in the order
        ``perm`` (``outlier_idx`` → permuted positions)."""
        inv = torch.argsort(perm)
        self.input_perm = perm.clone()
        self.act_scale, self.act_zero = self.act_scale[perm].clone(), self.act_zero[perm].clone()
        self.act_clip = self.act_clip[perm].clone()
        if self.outlier_idx.numel():
            self.outlier_idx = inv[self.outlier_idx]

    @property
    def permuted(self) -> bool:
        """True when the input channels are stored in a permuted order (``input_perm``)."""
        return self.input_perm.numel() > 0

    def natural_order(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor whose last axis runs over the stored input channels, back in the natural order."""
        if not self.permuted:
            return t
        return t[..., torch.argsort(self.input_perm)]

    def effective_weight(self) -> torch.Tensor:
        """fp32 ``Ŵ`` in the units and channel order of the layer's input ``x``: ``y = x Ŵᵀ`` up to activation
        quantization (``W'_q diag(1/s)`` when activations are per channel, columns in the natural order)."""
        w = self.dequantized_weight
        if self.act is not None and self.act.folded:
            w = w / self.act_scale.reshape(1, -1)
        return self.natural_order(w)

    def set_modality_scale(self, t: torch.Tensor) -> None:
        """Install per-modality range multipliers ``t[M+1]`` (positive; last entry = pooled fallback)."""
        t = t.detach().float().reshape(-1)
        if t.numel() != len(Modality) + 1:
            raise ValueError(f"modality_scale needs {len(Modality) + 1} entries (one per modality + pooled), "
                             f"got {t.numel()}")
        if not bool((t > 0).all()) or not bool(torch.isfinite(t).all()):
            raise ValueError("modality_scale entries must be finite and positive")
        act = self.act
        if act is None or not (act.folded or act.dynamic):
            raise ValueError("per-modality ranges need static per-channel or dynamic per-token activations "
                             "(static per-tensor per-modality scales are the mquant method)")
        if act.dynamic and not bool(torch.isfinite(self.act_clip).all()):
            raise ValueError("per-modality ranges with dynamic activations scale the per-channel clip: set a "
                             "finite act_clip first")
        self.modality_scale = t.clone()

    @property
    def modality_dependent(self) -> bool:
        """True when the quantizer depends on the row's modality (needs ``modality_context`` at run time)."""
        return self.modality_scale.numel() > 0

    def row_modality_scale(self, n_rows: int) -> torch.Tensor | None:
        """``[N, 1]`` multiplier of each row's range, or None without per-modality ranges."""
        if self.modality_scale.numel() == 0:
            return None
        idx = row_modality_index(n_rows, len(Modality)).to(self.modality_scale.device)
        return self.modality_scale[idx].reshape(-1, 1)

    # ------------------------------------------------------------------ views
    @property
    def dequantized_weight(self) -> torch.Tensor:
        """fp32 ``W_q`` (folded units when activations are per channel). Cached; reset by ``_apply``."""
        if self._w_deq is None:
            from ..numerics import dequantize
            self._w_deq = dequantize(self.weight_codes, self.weight_scale, self.weight_zero, self.weight_spec)
        return self._w_deq

    def _zero_bias(self, w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``W_q z`` for per-channel zero points: the constant output bias term (cached with the weight)."""
        if getattr(self, "_zb", None) is None or self._zb[0] is not w:
            self._zb = (w, w @ z)
        return self._zb[1]

    def release_cache(self) -> int:
        """Drop the fp32 caches (``W_q`` and ``W_q z``; rebuilt lazily on the next forward); returns bytes freed."""
        w = self._w_deq
        freed = w.numel() * w.element_size() if w is not None else 0
        self._w_deq = None
        self._zb = None           # (W_q, W_q z): holds W_q too
        return freed

    @property
    def has_cache(self) -> bool:
        """Whether an fp32 dequantized-weight cache is held."""
        return self._w_deq is not None

    def _apply(self, fn, recurse=True):
        self._w_deq = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._w_deq = None
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def integer_weight(self) -> bool:
        """True when the product can run on integer weight codes (uniform, symmetric weights)."""
        return self.weight_spec.fmt == "int" and bool((self.weight_zero == 0).all())

    # ------------------------------------------------------------------ activation quantization
    def quantize_input(self, x: torch.Tensor, need_resid: bool = True) -> tuple[
            torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``x[N, C]`` → (integer codes as fp32, zero point, row scale or None, DABC residual ``[N, K]`` of the
        outlier columns in the units of the GEMM weight, or None when ``need_resid`` is False)."""
        act = self.act
        spec = act.spec
        idx = self.outlier_idx
        t = self.row_modality_scale(x.shape[0])
        if act.dynamic:
            clipped = bool(torch.isfinite(self.act_clip).any())
            clip = self.act_clip if t is None else self.act_clip * t
            xc = torch.maximum(torch.minimum(x, clip), -clip) if clipped else x
            if spec.symmetric:     # same parameters as range_qparams, without the min/max pair
                s = (xc.abs().amax(-1, keepdim=True) / spec.symmetric_divisor).clamp_(min=MIN_SCALE)
                z = torch.zeros(())
            else:
                s, z = range_qparams(xc.amin(-1, keepdim=True), xc.amax(-1, keepdim=True), spec)
            x_q = quantize_to_float(xc, s, None if spec.symmetric else z, spec)
            resid = (x[:, idx] - s * (x_q[:, idx] - z)) if need_resid else None      # in x units
            return x_q, (z if not spec.symmetric else None), s, resid
        s, z = self.act_scale, self.act_zero
        if act.folded:
            u = x / s if t is None else x / (s * t)
            x_q = torch.clamp(torch.round(u) + z, spec.qmin, spec.qmax)
            resid = (u[:, idx] - (x_q[:, idx] - z[idx])) if need_resid else None    # in folded units
            if t is not None and resid is not None:
                resid = resid * t          # the row scale t_m applies to the whole row's product
            return x_q, (z if not spec.symmetric else None), t, resid
        x_q = quantize_to_float(x, s, z, spec)
        resid = (x[:, idx] - s * (x_q[:, idx] - z)) if need_resid else None
        return x_q, (z if not spec.symmetric else None), s, resid

    def dabc_residual(self, x: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` residual of the outlier channels that takes the 16-bit path (zero where not bypassed)."""
        r = resid
        if self.dabc == "sparse":
            keep = x[:, self.outlier_idx].abs() > self.outlier_threshold
            r = r * keep
            if self.track_bypass:
                self.bypass_elements += int(keep.sum())
        elif self.track_bypass:
            self.bypass_elements += r.numel()
        return r

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, matmul=None) -> torch.Tensor:
        """Quantized product. ``matmul=None``: one fp32 GEMM of the integer activation codes with the
        dequantized weight (the same sums as the integer kernel, in another accumulation order: agrees with it
        to fp32 rounding, ~1e-6 relative). ``matmul=float_matmul`` (or an int8 kernel): the per-group integer
        product of :func:`integer_linear`, bit-identical to the runtime."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if self.permuted:
            x2 = x2[:, self.input_perm]
        if self.act is None:
            y = x2 @ self.dequantized_weight.T
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*shape[:-1], -1).to(x.dtype)
        use_dabc = self.dabc != "none" and self.outlier_idx.numel() > 0
        x_q, x_zero, x_scale, resid = self.quantize_input(x2, need_resid=use_dabc)
        if matmul is None:
            w = self.dequantized_weight
            if x_zero is not None and self.act.folded:
                y = x_q @ w.T - self._zero_bias(w, x_zero)
            else:
                y = (x_q - x_zero if x_zero is not None else x_q) @ w.T
            if x_scale is not None:
                y = y * x_scale.reshape(-1, 1) if x_scale.numel() > 1 else y * x_scale.reshape(())
        elif self.integer_weight:
            y = integer_linear(x_q, self.weight_codes, self.weight_scale, x_zero=x_zero, x_scale=x_scale,
                               group_size=self.weight_spec.group_size, bias=None, matmul=matmul)
        else:   # code-book weights: integer activations times dequantized weights (a LUT kernel's product)
            xz = x_q - x_zero if x_zero is not None else x_q
            y = xz @ self.dequantized_weight.T
            if x_scale is not None:
                y = y * x_scale.reshape(-1, 1) if x_scale.numel() > 1 else y * x_scale.reshape(())
        if self.track_bypass:
            self.total_elements += x2.numel()
        if use_dabc:
            r = self.dabc_residual(x2, resid)
            y = y + r @ self.dequantized_weight[:, self.outlier_idx].T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1).to(x.dtype)

    def extra_repr(self) -> str:
        a = "A16" if self.act is None else (f"A{self.act.spec.bits}-{self.act.spec.granularity}"
                                            f"{'-dyn' if self.act.dynamic else '-static'}")
        w = f"W{self.weight_spec.bits}-{self.weight_spec.granularity}"
        if self.weight_spec.granularity == "group":
            w += str(self.weight_spec.group_size)
        if self.weight_spec.fmt != "int":
            w += f"-{self.weight_spec.fmt}"
        d = f", dabc={self.dabc}[{self.outlier_idx.numel()}]" if self.dabc != "none" else ""
        p = ", groups over scale-sorted channels" if self.permuted else ""
        return f"in={self.in_features}, out={self.out_features}, {w}, {a}{d}{p}"


def has_modality_quantizers(model: nn.Module) -> bool:
    """True when some layer of ``model`` quantizes activations per token modality."""
    return any(getattr(m, "modality_dependent", False) for m in model.modules())

"""Streaming per-input-channel statistics, kept separately per modality.

For the rows ``x_n ∈ R^C`` (tokens) of one modality that reach a linear layer, padding excluded, we keep

    min_c, max_c (fp32),   S_c = Σ_n x_{n,c},   S1_c = Σ_n |x_{n,c}|,  S2_c = Σ_n x_{n,c}²,  S3_c = Σ_n x_{n,c}³,  S4_c = Σ_n x_{n,c}⁴,
    and the row count n.

Power sums are accumulated (reduced) in float64 so that long calibrations do not lose precision; everything is
returned as fp32. From them: mean |x| = S1/n, rms = sqrt(S2/n), and the (non-excess) kurtosis
``κ = m4 / m2²`` with central moments from the raw sums.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .modality import ALL, Modality


class NonFiniteActivationError(FloatingPointError):
    """NaN or inf reached a quantized layer during calibration."""


@dataclass
class ChannelStats:
    """Accumulators for one modality of one layer (module docstring)."""

    channels: int
    count: int = 0
    min: torch.Tensor = field(default=None)
    max: torch.Tensor = field(default=None)
    sum_first: torch.Tensor = field(default=None)
    sum_abs: torch.Tensor = field(default=None)
    sum_sq: torch.Tensor = field(default=None)
    sum_cube: torch.Tensor = field(default=None)
    sum_quad: torch.Tensor = field(default=None)

    def __post_init__(self):
        c = self.channels
        if self.min is None:
            self.min = torch.full((c,), float("inf"))
            self.max = torch.full((c,), float("-inf"))
            self.sum_first, self.sum_abs, self.sum_sq, self.sum_cube, self.sum_quad = (
                torch.zeros(c, dtype=torch.float64) for _ in range(5))

    def update(self, x: torch.Tensor) -> None:
        """Add rows ``x[N, C]``."""
        if x.shape[0] == 0:
            return
        x32 = x.float()
        self.min = torch.minimum(self.min, x32.amin(0))
        self.max = torch.maximum(self.max, x32.amax(0))
        # the five column sums of one batch as one fp32 GEMV (column reductions are slow on CPU), accumulated
        # across batches in fp64
        ones = torch.ones(1, x32.shape[0])
        x2 = x32 * x32
        self.sum_first += (ones @ x32)[0].double()
        self.sum_abs += (ones @ x32.abs())[0].double()
        self.sum_sq += (ones @ x2)[0].double()
        self.sum_cube += (ones @ (x2 * x32))[0].double()
        self.sum_quad += (ones @ x2.square_())[0].double()
        self.count += x.shape[0]

    def add(self, other: ChannelStats) -> None:
        """In-place merge of ``other`` (rows observed elsewhere) into these accumulators."""
        if other.count == 0:
            return
        self.count += other.count
        self.min, self.max = torch.minimum(self.min, other.min), torch.maximum(self.max, other.max)
        for k in ("sum_first", "sum_abs", "sum_sq", "sum_cube", "sum_quad"):
            getattr(self, k).add_(getattr(other, k))

    def merge(self, other: ChannelStats) -> ChannelStats:
        out = ChannelStats(self.channels)
        out.count = self.count + other.count
        out.min, out.max = torch.minimum(self.min, other.min), torch.maximum(self.max, other.max)
        for k in ("sum_first", "sum_abs", "sum_sq", "sum_cube", "sum_quad"):
            setattr(out, k, getattr(self, k) + getattr(other, k))
        return out

    @property
    def empty(self) -> bool:
        return self.count == 0

    def _n(self) -> float:
        if self.count == 0:
            raise ValueError("no calibration rows were recorded for this layer/modality")
        return float(self.count)

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.sum_abs / self._n()).float()

    @property
    def mean(self) -> torch.Tensor:
        return (self._raw_mean()).float()

    def _raw_mean(self) -> torch.Tensor:
        return self.sum_first / self._n()

    @property
    def rms(self) -> torch.Tensor:
        return (self.sum_sq / self._n()).sqrt().float()

    @property
    def std(self) -> torch.Tensor:
        n = self._n()
        m = self._raw_mean()
        return (self.sum_sq / n - m * m).clamp(min=0).sqrt().float()

    @property
    def kurtosis(self) -> torch.Tensor:
        """Pearson kurtosis ``E[(x−μ)⁴] / Var²`` per channel (3 for a Gaussian)."""
        n = self._n()
        m1 = self._raw_mean()
        m2, m3, m4 = self.sum_sq / n, self.sum_cube / n, self.sum_quad / n
        var = (m2 - m1 * m1).clamp(min=1e-30)
        c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1 ** 4
        return (c4 / (var * var)).float()

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.min.abs(), self.max.abs())

    def state(self) -> dict[str, torch.Tensor]:
        return {"count": torch.tensor(self.count), "min": self.min, "max": self.max, "sum": self.sum_first,
                "sum_abs": self.sum_abs, "sum_sq": self.sum_sq, "sum_cube": self.sum_cube,
                "sum_quad": self.sum_quad}


class ModalityStats:
    """Per-modality :class:`ChannelStats` of one layer plus the pooled ``"all"`` entry (padding excluded)."""

    def __init__(self, channels: int, name: str = ""):
        self.channels = channels
        self.name = name
        self.by_modality: dict[str, ChannelStats] = {}
        self.all = ChannelStats(channels)

    def update(self, x: torch.Tensor, ids: torch.Tensor | None, fallback: Modality | None = None) -> None:
        """Add ``x[..., C]``; ``ids`` are per-row modality ids (``PAD`` rows skipped).

        When ``ids`` is ``None`` or does not have one entry per row (e.g. a cross-attention projection reading
        the encoder sequence), every row is attributed to ``fallback`` (or only to ``"all"`` when it is None).
        """
        x2 = x.detach().reshape(-1, x.shape[-1])
        # amin/amax propagate NaN and show inf: a cheap exact test for any non-finite value
        if x2.numel() and not (torch.isfinite(x2.amin()) and torch.isfinite(x2.amax())):
            bad = int((~torch.isfinite(x2)).sum())
            raise NonFiniteActivationError(
                f"{bad} NaN/inf activation values entered layer {self.name or '<unnamed>'} during calibration; "
                "check the model weights (a model with NaN weights?) and the calibration inputs")
        if ids is None or ids.numel() != x2.shape[0]:
            self.all.update(x2)
            if fallback is not None:
                self._get(fallback.label).update(x2)
            return
        flat = ids.reshape(-1).to(torch.int64)
        # each row is observed once, in its modality; "all" is the merge of the modalities
        for m in Modality:
            sel = flat == int(m)
            n = int(sel.sum())
            if n == 0:
                continue
            part = ChannelStats(self.channels)
            part.update(x2 if n == flat.numel() else x2[sel])
            self._get(m.label).add(part)
            self.all.add(part)

    def _get(self, label: str) -> ChannelStats:
        if label not in self.by_modality:
            self.by_modality[label] = ChannelStats(self.channels)
        return self.by_modality[label]

    def __getitem__(self, label: str) -> ChannelStats:
        if label == ALL:
            return self.all
        if label not in self.by_modality:
            raise KeyError(f"layer {self.name} saw no {label} tokens during calibration "
                           f"(seen: {', '.join(self.modalities) or 'none'})")
        return self.by_modality[label]

    @property
    def modalities(self) -> list[str]:
        return [m for m in (x.label for x in Modality) if m in self.by_modality]

    @property
    def count(self) -> int:
        return self.all.count

    def summary(self) -> dict:
        """JSON-ready per-modality summary (range, mean |x|, kurtosis quantiles) for logs and ``inspect``."""
        out = {}
        for label in [ALL, *self.modalities]:
            st = self[label]
            if st.empty:
                continue
            absmax = st.absmax
            kurt = st.kurtosis
            out[label] = {
                "tokens": st.count,
                "min": float(st.min.min()), "max": float(st.max.max()),
                "absmax_median_channel": float(absmax.median()),
                "absmax_max_over_median": float(absmax.max() / absmax.median().clamp(min=1e-12)),
                "mean_abs": float(st.mean_abs.mean()),
                "kurtosis_median": float(kurt.median()), "kurtosis_max": float(kurt.max()),
                "top_channels": absmax.topk(min(5, absmax.numel())).indices.tolist(),
            }
        return out

"""Dispersion score and outlier-channel mask (paper Eq. 5–6, in the well-defined form of method.md §1.2–1.3).

Dispersion of input channel ``c`` (range normalised by the density of the inlier body)::

    D_c = (max_c − min_c) / log1p(mean_n |x_{n,c}| + ε),      ε = 1e-5                          (Eq. 5)

Outlier-channel mask with a local (this layer's channels) and a global (all quantized layers' channels)
threshold, ``k`` standard deviations above the mean (k = 2 in the paper)::

    m_c = 1[D_c > μ_l + k σ_l  ∨  D_c > μ_g + k σ_g]                                            (Eq. 6)

Per-modality variant (our extension): scores are computed from each modality's own statistics; a channel is
an outlier when it is one for *any* modality (union of the per-modality local tests, each against that
modality's own μ_l, σ_l; the global test uses the pooled score). A channel that only audio tokens push out of
range is then protected even if text dominates the token count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .channel_stats import ChannelStats, ModalityStats

EPS = 1e-5


def dispersion_score(stats: ChannelStats) -> torch.Tensor:
    """Eq. 5 per input channel from streaming statistics (padding already excluded by the collector)."""
    if stats.empty:
        raise ValueError("dispersion_score needs calibration rows; this layer/modality saw none")
    return ((stats.max - stats.min) / torch.log1p(stats.mean_abs + EPS)).float()


@dataclass(frozen=True)
class Threshold:
    """``μ + kσ`` of a population of dispersion scores."""

    mean: float
    std: float
    k: float

    @property
    def value(self) -> float:
        return self.mean + self.k * self.std

    @classmethod
    def of(cls, scores: torch.Tensor, k: float) -> Threshold:
        s = scores.double()
        return cls(float(s.mean()), float(s.std(unbiased=False)), k)


def outlier_mask(scores: torch.Tensor, local: Threshold | None, global_: Threshold | None) -> torch.Tensor:
    """Eq. 6: boolean mask of outlier channels (either threshold may be disabled with ``None``)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if local is not None:
        mask |= scores > local.value
    if global_ is not None:
        mask |= scores > global_.value
    return mask


def global_threshold(all_stats: dict[str, ModalityStats], k: float) -> Threshold:
    """μ_g + kσ_g over the pooled dispersion scores of every channel of every layer in ``all_stats``."""
    scores = [dispersion_score(st.all) for st in all_stats.values() if st.count > 0]
    if not scores:
        raise ValueError("no layer has calibration statistics for the global threshold")
    return Threshold.of(torch.cat(scores), k)


def modality_outlier_mask(stats: ModalityStats, k: float, global_: Threshold | None = None,
                          per_modality: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Outlier mask of one layer: (mask, pooled scores, per-modality masks/thresholds for the report)."""
    pooled = dispersion_score(stats.all)
    local = Threshold.of(pooled, k)
    mask = outlier_mask(pooled, local, global_)
    detail = {"local_threshold": local.value, "global_threshold": global_.value if global_ else None}
    if per_modality:
        for label in stats.modalities:
            st = stats[label]
            if st.count < 2:
                continue
            sc = dispersion_score(st)
            m = outlier_mask(sc, Threshold.of(sc, k), None)
            detail[f"outliers_{label}"] = int(m.sum())
            mask |= m
    return mask, pooled, detail

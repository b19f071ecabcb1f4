"""Perplexity of a causal LM over non-overlapping token windows.

Every window of ``T`` tokens is scored independently (no context carried between windows): position ``t`` predicts
token ``t+1``, so a window contributes ``T - 1`` scored tokens. With ``n`` windows::

    NLL_w  = - sum_{t=0}^{T-2} log p(x_{w,t+1} | x_{w,0..t})          (summed NLL of window w)
    PPL    = exp( sum_w NLL_w / (n * (T - 1)) )

i.e. the exponential of the mean NLL over *all scored tokens* (a token-weighted mean, never a mean of per-batch
means, which would over-weight a short final batch). Log-probabilities are computed in fp32 with
``log_softmax`` / ``cross_entropy`` whatever the model's dtype.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["PerplexityResult", "evaluate_perplexity", "perplexity"]


@dataclass
class PerplexityResult:
    """Outcome of :func:`evaluate_perplexity`.

    Attributes:
        ppl: ``exp(total_nll / tokens)``.
        nll_per_window: float64 tensor ``[n]`` of each window's *mean* token NLL (``NLL_w / (T - 1)``), in nats.
        tokens: total number of scored tokens, ``n * (T - 1)``.
        tokens_per_window: ``T - 1``.
    """

    ppl: float
    nll_per_window: torch.Tensor
    tokens: int
    tokens_per_window: int

    @property
    def mean_nll(self) -> float:
        """Token-weighted mean NLL in nats (``log(ppl)``)."""
        return float(self.nll_per_window.double().mean())

    def confidence_interval(self, level: float = 0.95) -> tuple[float, float]:
        """Normal-approximation confidence interval of the perplexity, treating windows as i.i.d. draws.

        With window mean NLLs ``m_w`` (all windows have equal length, so their plain mean is the token-weighted
        mean), ``se = std(m_w, ddof=1) / sqrt(n)`` and the interval is ``exp(mean(m) -/+ z * se)`` with
        ``z = Phi^{-1}((1 + level) / 2)``. With a single window the interval collapses to ``(ppl, ppl)``.
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
        n = self.nll_per_window.numel()
        mean = self.mean_nll
        if n < 2:
            return (_exp(mean), _exp(mean))
        se = float(self.nll_per_window.double().std(unbiased=True)) / math.sqrt(n)
        z = statistics.NormalDist().inv_cdf((1.0 + level) / 2.0)
        return (_exp(mean - z * se), _exp(mean + z * se))

    def to_dict(self) -> dict:
        lo, hi = self.confidence_interval()
        return {
            "ppl": self.ppl,
            "mean_nll": self.mean_nll,
            "windows": int(self.nll_per_window.numel()),
            "tokens": self.tokens,
            "tokens_per_window": self.tokens_per_window,
            "ppl_ci95": [lo, hi],
        }


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _logits_of(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None:
        if isinstance(output, torch.Tensor):
            logits = output
        elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            logits = output[0]
        else:
            raise ValueError(
                f"cannot find logits in the model output of type {type(output).__name__}; the model must return "
                "an object with a `.logits` attribute, a logits tensor, or a tuple whose first element is the "
                "logits (wrap it in a module that does)")
    return logits


def _validate_windows(windows: torch.Tensor) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor):
        raise TypeError(f"windows must be a LongTensor [n, T], got {type(windows).__name__}; "
                        "stack your token windows with torch.stack / torch.tensor")
    if windows.dim() != 2:
        raise ValueError(f"windows must be 2-D [n_windows, window_length], got shape {tuple(windows.shape)}; "
                         "use windows.view(-1, T) to split a 1-D token stream")
    if windows.shape[0] == 0:
        raise ValueError("windows is empty (0 windows): the evaluation text produced no full window; use a longer "
                         "text or a shorter window length")
    if windows.shape[1] < 2:
        raise ValueError(f"windows have length {windows.shape[1]} but need at least 2 tokens each (one context "
                         "token and one predicted token); use a longer window length")
    if windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise ValueError(f"windows must hold integer token ids, got dtype {windows.dtype}; use windows.long()")
    return windows.long()


def evaluate_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                        progress: bool = True) -> PerplexityResult:
    """Score ``windows`` (LongTensor ``[n, T]``) with ``model`` and return the perplexity and per-window NLLs.

    ``model(input_ids=...)`` must return logits ``[b, T, V]`` (``.logits``, a tensor, or a tuple's first item).
    The model is put in eval mode for the duration of the call (its training flag is restored afterwards) and run
    under ``torch.inference_mode()``. Per window, ``NLL_w = sum_t CE(logits_t.float(), x_{t+1})``; the result is
    ``ppl = exp(sum_w NLL_w / (n * (T - 1)))``.
    """
    windows = _validate_windows(windows)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, length = windows.shape
    device = _model_device(model)
    config = getattr(model, "config", None)
    extra = {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}

    nll_sums = torch.zeros(n, dtype=torch.float64)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    done_tokens = 0
    try:
        with torch.inference_mode(), tqdm(total=n, desc="perplexity", unit="win", disable=not progress,
                                          dynamic_ncols=True) as bar:
            for start in range(0, n, batch_size):
                batch = windows[start:start + batch_size].to(device)
                logits = _logits_of(model(input_ids=batch, **extra))
                if logits.shape[:2] != batch.shape:
                    raise ValueError(f"model returned logits of shape {tuple(logits.shape)} for input "
                                     f"{tuple(batch.shape)}; expected [batch, seq, vocab] covering every position")
                targets = batch[:, 1:]
                for i in range(batch.shape[0]):
                    # one row at a time: the fp32 copy of the logits stays [T-1, V] even for huge vocabularies
                    nll = F.cross_entropy(logits[i, :-1].float(), targets[i], reduction="sum")
                    nll_sums[start + i] = float(nll)
                total_nll += float(nll_sums[start:start + batch.shape[0]].sum())
                done_tokens += batch.shape[0] * (length - 1)
                bar.update(batch.shape[0])
                bar.set_postfix(ppl=f"{_exp(total_nll / done_tokens):.3f}")
    finally:
        model.train(was_training)

    tokens = n * (length - 1)
    return PerplexityResult(
        ppl=_exp(float(nll_sums.sum()) / tokens),
        nll_per_window=nll_sums / (length - 1),
        tokens=tokens,
        tokens_per_window=length - 1,
    )


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """``exp(total NLL / total scored tokens)`` over non-overlapping windows; see :func:`evaluate_perplexity`."""
    return evaluate_perplexity(model, windows, batch_size=batch_size, progress=progress).ppl

"""Output fidelity of a quantized (candidate) model against its full-precision reference, split by modality.

Both models run on the same samples (dicts of model keyword arguments). For every token position ``i`` that is
not padding (``modality_ids != PAD``), with final hidden states ``h_fp, h_q`` (``[H]``) and next-token
distributions ``p_fp = softmax(z_fp)``, ``p_q = softmax(z_q)`` (``[V]``), all in fp32:

    cos_i = <h_q, h_fp> / (max(||h_q||, eps) * max(||h_fp||, eps))
    KL_i  = sum_v p_fp[v] * (log p_fp[v] - log p_q[v])           (log_softmax; clamped at 0 against rounding)

For a token set ``S`` (one modality, or ``all`` non-padding tokens, pooled over every sample):

    cosine(S)    = mean_{i in S} cos_i
    rel_error(S) = sqrt( sum_{i in S} ||h_q,i - h_fp,i||^2 / sum_{i in S} ||h_fp,i||^2 )
    kl(S)        = mean_{i in S} KL_i

The relative error is a ratio of sums of squares (so large-norm tokens weigh more), not a mean of per-token
ratios. Sums are accumulated in float64.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from morphoquant.statistics.modality import ALL, PAD, Modality

__all__ = ["FidelityReport", "ModalityFidelity", "default_hidden_states", "output_fidelity"]

_KL_CHUNK = 1024  # token rows per fp32 log_softmax chunk (bounds memory for large vocabularies)


@dataclass
class ModalityFidelity:
    """Fidelity metrics over one token set (see the module docstring for the formulas)."""

    tokens: int
    cosine: float
    rel_error: float
    kl: float

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "cosine": self.cosine, "rel_error": self.rel_error, "kl": self.kl}


@dataclass
class FidelityReport:
    """Per-modality fidelity; keys of ``per_modality`` are ``"all"`` then the present modality labels
    (``"text"``, ``"image"``, ``"video"``, ``"audio"``) in :class:`Modality` order."""

    per_modality: dict[str, ModalityFidelity] = field(default_factory=dict)
    samples: int = 0

    def __getitem__(self, key: str) -> ModalityFidelity:
        return self.per_modality[key]

    @property
    def modalities(self) -> list[str]:
        return list(self.per_modality)

    def to_dict(self) -> dict:
        return {"samples": self.samples, "per_modality": {k: v.to_dict() for k, v in self.per_modality.items()}}


class _Accumulator:
    def __init__(self) -> None:
        self.tokens = 0
        self.cos_sum = 0.0
        self.diff_sq = 0.0
        self.ref_sq = 0.0
        self.kl_sum = 0.0

    def add(self, cos: torch.Tensor, diff_sq: torch.Tensor, ref_sq: torch.Tensor, kl: torch.Tensor) -> None:
        self.tokens += int(cos.numel())
        self.cos_sum += float(cos.double().sum())
        self.diff_sq += float(diff_sq.double().sum())
        self.ref_sq += float(ref_sq.double().sum())
        self.kl_sum += float(kl.double().sum())

    def result(self) -> ModalityFidelity:
        if self.ref_sq > 0:
            rel = math.sqrt(self.diff_sq / self.ref_sq)
        else:
            rel = 0.0 if self.diff_sq == 0 else math.inf
        return ModalityFidelity(tokens=self.tokens, cosine=self.cos_sum / self.tokens, rel_error=rel,
                                kl=self.kl_sum / self.tokens)


def default_hidden_states(output: Any) -> torch.Tensor:
    """Final hidden states of a model output: ``output.hidden_states[-1]`` (``[batch, seq, hidden]``).

    Raises a ValueError naming the available output fields when the output carries no ``hidden_states`` (e.g.
    encoder-decoder models expose ``decoder_hidden_states`` / ``encoder_hidden_states`` instead).
    """
    hidden = getattr(output, "hidden_states", None)
    if hidden is None:
        if hasattr(output, "keys"):
            available = [k for k in output if getattr(output, k, None) is not None]
        else:
            available = [type(output).__name__]
        raise ValueError(
            "the model output has no `hidden_states` (available: " + ", ".join(map(str, available)) + "); "
            "output_fidelity needs the final hidden states: pass hidden_states_fn=lambda out: "
            "out.decoder_hidden_states[-1] (or whichever field holds them), or wrap the model so its output "
            "has `.hidden_states`")
    if isinstance(hidden, (tuple, list)):
        if not hidden:
            raise ValueError("the model output's `hidden_states` is an empty sequence")
        hidden = hidden[-1]
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"`hidden_states` must be a tensor or a sequence of tensors, got {type(hidden).__name__}")
    return hidden


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model output ({type(output).__name__}) has no `.logits` tensor; output_fidelity needs "
                         "the next-token logits [batch, seq, vocab]")
    return logits


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to(sample: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in sample.items()}


def _run(model: nn.Module, sample: dict, hidden_states_fn: Callable[[Any], torch.Tensor]):
    kwargs = _to(sample, _model_device(model))
    kwargs["output_hidden_states"] = True
    kwargs["return_dict"] = True
    out = model(**kwargs)
    return hidden_states_fn(out), _logits(out)


def kl_from_logprobs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` per row of log-probabilities ``[..., V]``, in their dtype,
    clamped at 0 (a true KL is >= 0; rounding can give -1e-9)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)


def _kl_rows(ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_fp || p_q) per row of ``[N, V]`` logits, fp32, in chunks of rows."""
    out = []
    for s in range(0, ref_logits.shape[0], _KL_CHUNK):
        lp = F.log_softmax(ref_logits[s:s + _KL_CHUNK].float(), dim=-1)
        lq = F.log_softmax(cand_logits[s:s + _KL_CHUNK].float(), dim=-1)
        out.append(kl_from_logprobs(lp, lq))
    return torch.cat(out) if out else ref_logits.new_zeros(0, dtype=torch.float32)


def output_fidelity(reference_model: nn.Module, candidate_model: nn.Module, samples: list[dict],
                    modality_ids: list[torch.Tensor],
                    hidden_states_fn: Callable[[Any], torch.Tensor] = default_hidden_states,
                    eps: float = 1e-8) -> FidelityReport:
    """Compare ``candidate_model`` to ``reference_model`` on ``samples``, per modality (formulas: module docstring).

    Args:
        reference_model: the full-precision model (``p_fp``, ``h_fp``).
        candidate_model: the quantized model (``p_q``, ``h_q``).
        samples: dicts of model keyword arguments; each is run through both models with
            ``output_hidden_states=True, return_dict=True`` under ``torch.inference_mode()`` in eval mode.
        modality_ids: one int tensor per sample, shaped like the output sequence ``[batch, seq]`` (a 1-D
            ``[seq]`` is accepted for batch 1), holding :class:`Modality` values or ``PAD`` (-1, excluded).
        hidden_states_fn: ``output -> [batch, seq, hidden]`` final hidden states; the default takes
            ``output.hidden_states[-1]`` and raises a clear error when the model puts them elsewhere.
        eps: norm floor of the cosine similarity.

    Returns:
        A :class:`FidelityReport` with ``"all"`` plus one entry per modality present in the ids.
    """
    if len(samples) != len(modality_ids):
        raise ValueError(f"got {len(samples)} samples but {len(modality_ids)} modality_ids tensors; pass exactly "
                         "one modality_ids tensor per sample, in the same order")
    if not samples:
        raise ValueError("samples is empty; pass at least one sample dict of model keyword arguments")

    accs: dict[str, _Accumulator] = {}
    states = [(m, m.training) for m in (reference_model, candidate_model)]
    for m, _ in states:
        m.eval()
    try:
        with torch.inference_mode():
            for index, (sample, ids) in enumerate(zip(samples, modality_ids)):
                if not isinstance(sample, dict):
                    raise TypeError(f"sample {index} is a {type(sample).__name__}, expected a dict of model "
                                    "keyword arguments")
                h_fp, z_fp = _run(reference_model, sample, hidden_states_fn)
                h_q, z_q = _run(candidate_model, sample, hidden_states_fn)
                device = h_fp.device
                h_q, z_q = h_q.to(device), z_q.to(device)
                if h_q.shape != h_fp.shape or z_q.shape != z_fp.shape:
                    raise ValueError(f"sample {index}: candidate outputs (hidden {tuple(h_q.shape)}, logits "
                                     f"{tuple(z_q.shape)}) do not match the reference (hidden {tuple(h_fp.shape)}, "
                                     f"logits {tuple(z_fp.shape)})")
                seq_shape = h_fp.shape[:-1]
                ids = torch.as_tensor(ids)
                if ids.dim() == 1 and len(seq_shape) == 2 and seq_shape[0] == 1:
                    ids = ids.unsqueeze(0)
                if tuple(ids.shape) != tuple(seq_shape):
                    raise ValueError(f"sample {index}: modality_ids has shape {tuple(ids.shape)} but the model's "
                                     f"output sequence is {tuple(seq_shape)} ([batch, seq]); build the ids from "
                                     "the sequence the model actually sees (after placeholder expansion)")
                if z_fp.shape[:-1] != seq_shape:
                    raise ValueError(f"sample {index}: logits of shape {tuple(z_fp.shape)} do not cover every "
                                     f"position of the hidden states {tuple(h_fp.shape)}; do not pass "
                                     "logits_to_keep or similar options in the sample")
                ids = ids.to(device).reshape(-1).long()
                unknown = ids[(ids != PAD) & ((ids < 0) | (ids > max(int(m) for m in Modality)))]
                if unknown.numel():
                    raise ValueError(f"sample {index}: modality_ids contain unknown values "
                                     f"{sorted(set(unknown.tolist()))}; use Modality values 0..3 or PAD (-1)")
                keep = ids != PAD
                if not bool(keep.any()):
                    continue
                hf = h_fp.reshape(-1, h_fp.shape[-1])[keep].float()
                hq = h_q.reshape(-1, h_q.shape[-1])[keep].float()
                cos = (hf * hq).sum(-1) / (hf.norm(dim=-1).clamp_min(eps) * hq.norm(dim=-1).clamp_min(eps))
                diff_sq = (hq - hf).pow(2).sum(-1)
                ref_sq = hf.pow(2).sum(-1)
                kl = _kl_rows(z_fp.reshape(-1, z_fp.shape[-1])[keep], z_q.reshape(-1, z_q.shape[-1])[keep])
                kept_ids = ids[keep]
                accs.setdefault(ALL, _Accumulator()).add(cos, diff_sq, ref_sq, kl)
                for m in Modality:
                    sel = kept_ids == int(m)
                    if bool(sel.any()):
                        accs.setdefault(m.label, _Accumulator()).add(cos[sel], diff_sq[sel], ref_sq[sel], kl[sel])
    finally:
        for m, training in states:
            m.train(training)

    if ALL not in accs:
        raise ValueError("every position of every sample is padding (modality_ids == PAD); nothing to compare")
    order = [ALL] + [m.label for m in Modality]
    return FidelityReport(per_modality={k: accs[k].result() for k in order if k in accs}, samples=len(samples))

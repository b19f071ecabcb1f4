"""Token modalities and per-token modality masks.

Every calibration sample carries a ``modality_ids`` tensor with the same leading shape as the token sequence
of the stack it feeds (``[batch, seq]``). Each entry is one of :class:`Modality` or ``PAD`` (= -1) for padding
positions, which are excluded from every statistic and loss (method.md §3 defect 3).
"""
from __future__ import annotations

import contextlib
import contextvars
import enum

import torch

PAD = -1


class Modality(enum.IntEnum):
    TEXT = 0
    IMAGE = 1
    VIDEO = 2
    AUDIO = 3

    @property
    def label(self) -> str:
        return self.name.lower()


ALL = "all"
MODALITY_NAMES = tuple(m.label for m in Modality)


def modality_from_name(name: str) -> Modality:
    try:
        return Modality[name.upper()]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; expected one of {', '.join(MODALITY_NAMES)}") from None


def constant_modality_ids(shape: tuple[int, ...], modality: Modality,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Ids for a single-modality sequence (an encoder tower), padding marked where ``attention_mask == 0``."""
    ids = torch.full(shape, int(modality), dtype=torch.int8)
    if attention_mask is not None:
        ids[attention_mask.reshape(shape) == 0] = PAD
    return ids


def modality_ids_from_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                             token_modality: dict[int, Modality]) -> torch.Tensor:
    """Per-token ids for a decoder sequence: placeholder token ids map to their modality, everything else is text.

    ``token_modality`` maps special placeholder token ids (e.g. Qwen2.5-Omni ``<|IMAGE|>``, ``<|AUDIO|>``) to the
    modality whose embeddings replace them.
    """
    ids = torch.full(input_ids.shape, int(Modality.TEXT), dtype=torch.int8)
    for token_id, modality in token_modality.items():
        ids[input_ids == token_id] = int(modality)
    if attention_mask is not None:
        ids[attention_mask == 0] = PAD
    return ids


def present_modalities(ids: torch.Tensor) -> list[Modality]:
    return [m for m in Modality if bool((ids == int(m)).any())]


# ------------------------------------------------------------------ per-row modality ids at run time
_MODALITY_IDS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "morphoquant_modality_ids", default=None)


class ModalityContextError(RuntimeError):
    """A modality-dependent layer ran without (matching) per-row modality ids."""


@contextlib.contextmanager
def modality_context(ids: torch.Tensor | None):
    """Per-row modality ids (any shape with one entry per token row; ``PAD`` = -1) for the forwards inside.

    Layers whose quantizer depends on the token's modality (per-modality scales) read them with
    :func:`current_modality_ids`; the pipeline and every evaluator wrap forwards in this context."""
    token = _MODALITY_IDS.set(None if ids is None else ids.reshape(-1))
    try:
        yield
    finally:
        _MODALITY_IDS.reset(token)


def current_modality_ids() -> torch.Tensor | None:
    return _MODALITY_IDS.get()


def row_modality_index(n_rows: int, fallback: int) -> torch.Tensor:
    """Modality index per row of a layer's ``[n_rows, C]`` input from the current context (one id broadcasts to
    every row); padding and unknown ids map to ``fallback``. Raises :class:`ModalityContextError` without ids."""
    ids = current_modality_ids()
    if ids is None:
        raise ModalityContextError(
            "this layer has modality-specific activation scales and needs the token modalities: wrap the "
            "forward in `with morphoquant.statistics.modality_context(modality_ids):` "
            "(ids from adapter.decoder_modality_ids(sample))")
    if ids.numel() == 1:          # one modality for every row (e.g. a text-only evaluation)
        ids = ids.expand(n_rows)
    if ids.numel() != n_rows:
        raise ModalityContextError(f"modality context has {ids.numel()} ids but the layer got {n_rows} rows "
                                   "(ids of another sequence, or a KV-cache step without its own ids)")
    idx = ids.long()
    return torch.where((idx < 0) | (idx >= len(Modality)), torch.full_like(idx, fallback), idx)

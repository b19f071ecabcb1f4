"""Forward hooks that feed the inputs of linear layers, with their per-row modality ids, to observers."""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from .channel_stats import ModalityStats
from .modality import PAD, Modality


class Observer(Protocol):
    def __call__(self, name: str, x: torch.Tensor, ids: torch.Tensor | None) -> None: ...


class ActivationCollector:
    """Per-modality statistics (and optional extra observers) of the inputs of ``linears``.

    Set ``current_ids`` (per-row modality ids of the sequence being run) before each forward. Rows of a linear
    whose input row count differs from ``current_ids`` (cross-attention over another sequence) are attributed to
    ``fallback`` (see :meth:`ModalityStats.update`), given once or per linear name.
    """

    def __init__(self, linears: dict[str, nn.Module], fallback: Modality | dict[str, Modality] | None = None,
                 observers: list[Observer] | tuple = (), cross: set[str] = frozenset()):
        self.linears = linears
        self.fallback = fallback
        self.observers = list(observers)
        self.stats = {name: ModalityStats(mod.in_features, name) for name, mod in linears.items()}
        self.cross = set(cross)   # linears reading another sequence: never aligned with current_ids
        self.current_ids: torch.Tensor | None = None
        self._handles: list = []
        self._seen: dict = {}
        self.alias: dict[str, str] = {}     # linear -> the linear whose identical input it shares

    def _hook(self, name: str) -> Callable:
        def pre_hook(module, args):
            x = args[0]
            # linears fed by the same tensor (q/k/v, gate/up) share one set of statistics: observe it once
            key = (x.data_ptr(), tuple(x.shape), x._version)
            seen = self._seen.get(key)
            if seen is not None and seen[0] != name:
                self.alias[name] = seen[0]
                return
            # keep a reference so that the address cannot be reused by another tensor within this forward
            self._seen[key] = (name, x)
            x2 = x.detach().reshape(-1, x.shape[-1])
            ids = self.current_ids
            aligned = ids is not None and ids.numel() == x2.shape[0] and name not in self.cross
            fb = self.fallback.get(name) if isinstance(self.fallback, dict) else self.fallback
            self.stats[name].update(x2, ids if aligned else None, fb)
            row_ids = ids.reshape(-1) if aligned else None
            for obs in self.observers:
                obs(name, x2, row_ids)
        return pre_hook

    def __enter__(self) -> ActivationCollector:  # noqa: PYI034 — final class, Python 3.10 has no typing.Self
        for name, mod in self.linears.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()
        for name, first in self.alias.items():
            self.stats[name] = self.stats[first]
        for obs in self.observers:
            if hasattr(obs, "alias"):
                obs.alias.update(self.alias)

    def new_forward(self) -> None:
        """Call before each forward: input identity is only tracked within one forward."""
        self._seen.clear()


class InputSampler:
    """Keeps up to ``max_rows`` non-padding input rows per linear (first come, deterministic), with their ids.

    Methods that search quantization parameters on real activations (clip search, GPTQ-free scale search)
    read ``rows[name]`` (fp32 ``[n, C]``) and ``ids[name]`` (int8 ``[n]``, or ``None`` when unknown).
    """

    def __init__(self, max_rows: int = 4096, names: set[str] | None = None):
        self.max_rows = max_rows
        self.names = names
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._ids: dict[str, list[torch.Tensor]] = {}
        self._n: dict[str, int] = {}
        self.alias: dict[str, str] = {}

    def __call__(self, name: str, x: torch.Tensor, ids: torch.Tensor | None) -> None:
        if self.names is not None and name not in self.names:
            return
        have = self._n.get(name, 0)
        if have >= self.max_rows:
            return
        if ids is not None:
            keep = ids != PAD
            x, ids = x[keep], ids[keep]
        take = min(self.max_rows - have, x.shape[0])
        self._rows.setdefault(name, []).append(x[:take].float().clone())
        self._ids.setdefault(name, []).append(
            ids[:take].to(torch.int8).clone() if ids is not None else torch.full((take,), PAD, dtype=torch.int8))
        self._n[name] = have + take

    def rows(self, name: str) -> torch.Tensor:
        name = self.alias.get(name, name)
        if name not in self._rows:
            raise KeyError(f"no input rows were sampled for layer {name}")
        return torch.cat(self._rows[name])

    def ids(self, name: str) -> torch.Tensor:
        return torch.cat(self._ids[self.alias.get(name, name)])

    def clear(self) -> None:
        self._rows.clear()
        self._ids.clear()
        self._n.clear()


class HessianObserver:
    """Accumulates ``H = (2/N) Σ_n x_n x_nᵀ`` (fp32 ``[C, C]``) of each linear's non-padding input rows, the
    second-order statistic GPTQ needs."""

    def __init__(self, names: set[str] | None = None):
        self.names = names
        self.h: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}
        self.alias: dict[str, str] = {}

    def __call__(self, name: str, x: torch.Tensor, ids: torch.Tensor | None) -> None:
        if self.names is not None and name not in self.names:
            return
        if ids is not None:
            x = x[ids != PAD]
        x = x.double()
        if name not in self.h:
            self.h[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            self.n[name] = 0
        self.h[name] += x.T @ x
        self.n[name] += x.shape[0]

    def hessian(self, name: str) -> torch.Tensor:
        name = self.alias.get(name, name)
        if not self.n.get(name):
            raise KeyError(f"no input rows reached layer {name}: no Hessian for GPTQ")
        return (2.0 * self.h[name] / self.n[name]).float()

"""Resumable calibration: a checkpoint after every block, so a killed ``quantize`` restarts where it stopped.

Layout of the checkpoint directory (each file replaced atomically; ``progress.json`` is written last, so a
crash between writes leaves the previous consistent state)::

    progress.json            {"fingerprint", "done": [[stack, block], ...]}
    state.pt                 the method's whole-model state (e.g. global thresholds)
    blocks/<stack>.<i>.pt    block i as quantized (the whole module: QuantLinears and the norms or biases a
                             method folded scales into)
    acts.pt                  the propagated inputs of the next block
    report.pt                records, per-channel arrays, pass-through list and calibration seconds so far

Changes a method's ``prepare`` made outside the blocks (a rotation of the embeddings and head) are not saved:
the resuming run re-applies them with ``Method.restore``.

The fingerprint covers the recipe, the calibration samples and the model (config + parameter checksum), so a
checkpoint is never applied to a different run.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import torch
from torch import nn

from ..utils.atomic import atomic_write_with

FAULT_ENV = "MORPHOQUANT_FAULT_KILL_AFTER_BLOCK"   # fault injection for tests: SIGKILL after N checkpoints


def run_fingerprint(model: nn.Module, recipe_yaml: str, samples: list[dict]) -> str:
    h = hashlib.sha256(recipe_yaml.encode())
    cfg = getattr(model, "config", None)
    h.update((cfg.to_json_string() if hasattr(cfg, "to_json_string") else type(model).__name__).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(f"{float(p.double().sum()):.10e}".encode())
    for s in samples:
        for k in sorted(s):
            v = s[k]
            h.update(k.encode())
            if isinstance(v, torch.Tensor):
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _atomic_save(obj, path: Path) -> None:
    # temp file removed on failure; a full disk surfaces as OutputWriteError, not torch's errno-less RuntimeError
    atomic_write_with(path, lambda f: torch.save(obj, f))


class ResumeCheckpoint:
    def __init__(self, directory: str | Path, fingerprint: str):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.done: list[tuple[str, int]] = []
        self._saves = 0

    def load(self) -> bool:
        """True when a matching checkpoint exists (its state is then in ``self.done``)."""
        prog = self.dir / "progress.json"
        if not prog.exists():
            return False
        try:
            data = json.loads(prog.read_text())
        except (OSError, ValueError):
            return False
        if data.get("fingerprint") != self.fingerprint:
            return False
        self.done = [tuple(x) for x in data.get("done", [])]
        return bool(self.done)

    def state(self):
        return torch.load(self.dir / "state.pt", weights_only=False)

    def save_state(self, state) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "blocks").mkdir(exist_ok=True)
        _atomic_save(state, self.dir / "state.pt")

    def block_modules(self, stack: str, index: int) -> nn.Module | dict[str, nn.Module]:
        """The saved block (older checkpoints: a dict name -> QuantLinear)."""
        return torch.load(self.dir / "blocks" / f"{stack}.{index}.pt", weights_only=False)

    def activations(self):
        return torch.load(self.dir / "acts.pt", weights_only=False)

    def report(self):
        return torch.load(self.dir / "report.pt", weights_only=False)

    def save_block(self, stack: str, index: int, block: nn.Module, acts: list, report) -> None:
        _atomic_save(block, self.dir / "blocks" / f"{stack}.{index}.pt")
        _atomic_save(acts, self.dir / "acts.pt")
        _atomic_save({"records": report.records, "channels": report.channels,
                      "passthrough": report.passthrough, "seconds": report.seconds}, self.dir / "report.pt")
        self.done.append((stack, index))
        progress = json.dumps({"fingerprint": self.fingerprint, "done": self.done}).encode()
        atomic_write_with(self.dir / "progress.json", lambda f: f.write(progress))
        self._saves += 1
        kill_after = os.environ.get(FAULT_ENV)
        if kill_after and self._saves >= int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)

    def clear(self) -> None:
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)

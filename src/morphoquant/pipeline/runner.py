"""The layer-wise (sequential) quantization pipeline.

For each enabled stack (encoder towers first, then the decoder):

1. **capture** — run the model on every calibration sample with a pre-hook on the first block that records
   its inputs and stops the forward;
2. for block ``i``: **calibrate** (run the full-precision block on its inputs with observers on every linear:
   per-modality statistics, padding excluded, plus sampled input rows when the method wants them), keep the FP
   outputs; **quantize** (the method returns a ``QuantLinear`` per linear, swapped in place); **propagate** (run
   the quantized block on the same inputs: its outputs feed block ``i+1``, so every block is calibrated on the
   error its predecessors really make); log the mean per-token relative reconstruction error
   ``mean_n ‖y_q,n − y_fp,n‖ / ‖y_fp,n‖`` per modality.

Memory holds one block's inputs and outputs for the calibration set (optionally on disk), never the
activations of the whole network; a finished block keeps only its integer codes and scales (its fp32
dequantized-weight cache is dropped, see :func:`release_dequantized_weights`).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layers import QuantLinear
from ..methods import BlockContext, EmptyLayerError, Method
from ..methods.mquant import modality_context
from ..statistics import ALL, ActivationCollector, InputSampler, Modality, ModalityStats
from ..statistics.collector import HessianObserver
from ..utils.atomic import write_error
from ..utils.memory import peak_rss_mb
from .recipe import Recipe
from .stack import BlockStack, Sample

log = logging.getLogger("morphoquant")


class CalibrationDataError(ValueError):
    """Calibration data that cannot calibrate what the recipe asks for."""


class _StopForward(Exception):
    pass


OFFLOAD_PREFIX = "morphoquant-acts-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # exists, owned by someone else
        return True
    return True


def remove_stale_offload_dirs(tmp_root: str | os.PathLike | None = None) -> list[Path]:
    """Delete offload directories ``morphoquant-acts-<pid>-*`` left by processes that no longer exist.

    A run killed by SIGKILL or the OOM killer runs no cleanup, and its offloaded activations (≈ 1 GB at
    128 × 512 tokens on Qwen2.5-0.5B) would stay in the temp directory for good. The directory name carries the
    owner's pid, so a later run can tell a dead owner's leftovers from a live run's store. Returns what it removed.
    """
    import shutil
    root = Path(tmp_root or tempfile.gettempdir())
    removed = []
    for d in root.glob(f"{OFFLOAD_PREFIX}*-*"):
        pid = d.name[len(OFFLOAD_PREFIX):].split("-", 1)[0]
        if not d.is_dir() or not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            removed.append(d)
    if removed:
        log.info("removed %d offload director%s of finished processes: %s", len(removed),
                 "y" if len(removed) == 1 else "ies", ", ".join(str(d) for d in removed))
    return removed


class ActivationStore:
    """A list of per-sample block inputs kept in memory or, with ``offload``, in files of a temp directory.

    The directory is named ``morphoquant-acts-<pid>-…`` so that :func:`remove_stale_offload_dirs` (called on
    every offloading store's creation) can delete the leftovers of a killed run.
    """

    def __init__(self, offload: bool = False, tmp_root: str | os.PathLike | None = None):
        self.offload = offload
        self._items: list = []
        self._dir = None
        if offload:
            remove_stale_offload_dirs(tmp_root)
            self._dir = tempfile.TemporaryDirectory(prefix=f"{OFFLOAD_PREFIX}{os.getpid()}-", dir=tmp_root)

    def append(self, item) -> None:
        if self.offload:
            path = Path(self._dir.name) / f"{len(self._items)}-{time.monotonic_ns()}.pt"
            torch.save(item, path)
            self._items.append(path)
        else:
            self._items.append(item)

    def __getitem__(self, i):
        item = self._items[i]
        return torch.load(item, weights_only=False) if self.offload else item

    def __setitem__(self, i, value) -> None:
        if self.offload:
            torch.save(value, self._items[i])
        else:
            self._items[i] = value

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()


@dataclass
class _Captured:
    """Inputs of the first block for one sample: the hidden states, the other positional args and kwargs."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    hidden_key: str | None      # kwarg name when the hidden states were passed by keyword
    ids: torch.Tensor


@dataclass
class LayerRecord:
    stack: str
    block: int
    linears: dict
    rel_error: dict
    seconds: float
    peak_rss_mb: float


@dataclass
class QuantizationReport:
    recipe: str
    records: list[LayerRecord] = field(default_factory=list)
    passthrough: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    stacks: list[str] = field(default_factory=list)
    # "<stack>.<block>.<linear>" -> per-channel arrays (per-modality absmax/kurtosis, method arrays)
    channels: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "seconds": self.seconds, "peak_rss_mb": self.peak_rss_mb,
                "stacks": self.stacks, "passthrough": self.passthrough,
                "layers": [r.__dict__ for r in self.records]}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class LayerwiseRunner:
    """Runs one recipe over the stacks of one model (see module docstring)."""

    def __init__(self, model: nn.Module, stacks: list[BlockStack], recipe: Recipe, samples: list[Sample],
                 log_path: str | Path | None = None, progress: bool = True, method: Method | None = None,
                 resume_dir: str | Path | None = None):
        if not samples:
            raise CalibrationDataError("the calibration set is empty: pass at least one sample")
        self.model, self.stacks, self.recipe, self.samples = model, stacks, recipe, samples
        self.method = method or recipe.method_instance()
        self.progress = progress
        self.log_path = Path(log_path) if log_path else None
        self.module_names = {id(m): n for n, m in model.named_modules()}
        self.report = QuantizationReport(recipe.name)
        self.resume = None
        if resume_dir is not None:
            from .resume import ResumeCheckpoint, run_fingerprint
            self.resume = ResumeCheckpoint(resume_dir, run_fingerprint(model, recipe.to_yaml(), samples))

    # ---------------------------------------------------------------- capture
    def _capture(self, stack: BlockStack) -> ActivationStore:
        store = ActivationStore(self.recipe.offload)
        box: dict = {}

        def hook(module, args, kwargs):
            box["args"], box["kwargs"] = args, kwargs
            raise _StopForward

        handle = stack.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            uses = getattr(stack, "uses_sample", None)
            for sample in self.samples:
                if uses is not None and not uses(sample):
                    continue     # e.g. a text-only sample never reaches the vision tower
                box.clear()
                try:
                    with torch.no_grad():
                        stack.forward(sample)
                except _StopForward:
                    pass
                if "args" not in box:
                    raise CalibrationDataError(
                        f"stack {stack.name!r}: the calibration sample never reached its first block "
                        f"(does the sample contain the inputs this stack needs? keys: {sorted(sample)})")
                args, kwargs = box["args"], dict(box["kwargs"])
                if args:
                    hidden, rest, key = args[0], tuple(args[1:]), None
                else:
                    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                    hidden, rest = kwargs.pop(key), ()
                ids = stack.modality_ids(sample, hidden.shape)
                store.append(_Captured(hidden.detach(), rest, kwargs, key, ids))
        finally:
            handle.remove()
        if len(store) == 0:
            raise CalibrationDataError(
                f"no calibration sample reaches stack {stack.name!r}: add samples with its inputs "
                "(e.g. images for a vision tower, audio for an audio tower) or disable the stack in the recipe")
        return store

    @staticmethod
    def _run_block(block: nn.Module, c: _Captured, hidden: torch.Tensor | None = None) -> torch.Tensor:
        h = c.hidden if hidden is None else hidden
        with torch.no_grad(), modality_context(c.ids):
            if c.hidden_key is None:
                return _first(block(h, *c.args, **c.kwargs)).detach()
            return _first(block(*c.args, **{c.hidden_key: h}, **c.kwargs)).detach()

    # ---------------------------------------------------------------- calibration of a set of linears
    def _calibrate(self, stack: BlockStack, block: nn.Module, linears: dict[str, nn.Module],
                   store: ActivationStore, keep_outputs: bool, stats_only: bool = False
                   ) -> tuple[ActivationCollector, InputSampler | None, list | None]:
        # rows that do not follow the block's own sequence (cross-attention inputs) keep the modality they read
        cross = getattr(stack, "cross_inputs", {}) or {}
        tower = getattr(stack, "modality", None)
        fallback = {n: next((m for suf, m in cross.items() if n.endswith(suf)), tower) for n in linears}
        cross_names = {n for n in linears if any(n.endswith(suf) for suf in cross)}
        # stats_only (the network-wide pre-pass): no input rows and no GPTQ Hessians, which cost as much as the
        # block forward itself on the widest layer
        sampler = InputSampler(self.recipe.calibration.max_rows_per_layer) \
            if self.method.needs_inputs and not stats_only else None
        hessian = HessianObserver() if self.recipe.weight_method == "gptq" and not stats_only else None
        collector = ActivationCollector(linears, fallback, [o for o in (sampler, hessian) if o is not None],
                                        cross=cross_names)
        collector.hessian = hessian
        outs = [] if keep_outputs else None
        with collector:
            for i in range(len(store)):
                c = store[i]
                collector.current_ids = c.ids
                collector.new_forward()
                y = self._run_block(block, c)
                if outs is not None:
                    outs.append(y)
        return collector, sampler, outs

    def _check_empty(self, stack: BlockStack, index: int, stats: dict[str, ModalityStats],
                     linears: dict[str, nn.Module]) -> dict[str, nn.Module]:
        usable = {}
        for name, lin in linears.items():
            if stats[name].count > 0:
                usable[name] = lin
                continue
            full = f"{stack.name}.{index}.{name}"
            if self.recipe.on_empty_layer == "error":
                raise EmptyLayerError(
                    f"layer {full} received no calibration tokens (every token was padding, or the data never "
                    "routed through it); add calibration data that reaches it, or set on_empty_layer: passthrough "
                    "to keep it in full precision")
            log.warning("layer %s received no calibration tokens: kept in full precision (passthrough)", full)
            self.report.passthrough.append(full)
        return usable

    # ---------------------------------------------------------------- main loop
    def run(self) -> QuantizationReport:
        # calibration seconds: a resumed run adds this attempt's time to the seconds its checkpoint recorded
        self._t0, self._seconds_before = time.time(), 0.0
        enabled = [s for s in self.stacks if self.recipe.stack_enabled(s.name, s.default_enabled)]
        unknown = set(self.recipe.stacks) - {s.name for s in self.stacks}
        if unknown:
            raise CalibrationDataError(
                f"the recipe configures stack(s) {sorted(unknown)} that this model does not have "
                f"(it has: {', '.join(s.name for s in self.stacks)})")
        self.report.stacks = [s.name for s in enabled]
        resuming = self.resume is not None and self.resume.load()
        if resuming:
            state = self.resume.state()
            saved = self.resume.report()
            self.report.records = saved["records"]
            self.report.channels = saved["channels"]
            self.report.passthrough = saved["passthrough"]
            self._seconds_before = float(saved.get("seconds", 0.0))   # checkpoints older than this field: 0
            self.method.transform(self.model, enabled)
            self.method.restore(self.model, enabled, state)
            log.info("resuming from %s (%d blocks done)", self.resume.dir, len(self.resume.done))
        else:
            transformed = self.method.transform(self.model, enabled)
            global_stats = self._global_prepass(enabled) if self.method.needs_global_stats else None
            state = self.method.prepare(self.model, enabled, global_stats)
            if transformed:
                state = {**state, "transform": transformed}
            if self.resume is not None:
                self.resume.clear()
                self.resume.save_state(state)
        log_file = self._open_log() if self.log_path else None
        try:
            for stack in enabled:
                self._run_stack(stack, state, log_file)
        except BaseException:
            if log_file:
                try:
                    log_file.close()
                except OSError:     # the buffered line that already failed to write: keep the first error
                    pass
            raise
        if log_file:
            try:
                log_file.close()
            except OSError as e:
                raise (write_error(e, self.log_path) or e) from e
        self.report.seconds = self._elapsed()
        self.report.peak_rss_mb = peak_rss_mb()
        return self.report

    def _elapsed(self) -> float:
        """Calibration seconds so far, earlier attempts' checkpointed seconds included."""
        return self._seconds_before + time.time() - self._t0

    def _open_log(self):
        try:
            return open(self.log_path, "a")
        except OSError as e:
            raise (write_error(e, self.log_path) or e) from e

    def _log(self, log_file, line: str) -> None:
        try:
            log_file.write(line)
            log_file.flush()
        except OSError as e:     # a full disk: one clear line naming the fix, not a bare "[Errno 28]"
            raise (write_error(e, self.log_path) or e) from e

    def _global_prepass(self, stacks: list[BlockStack]) -> dict[str, ModalityStats]:
        """Full-precision statistics of every linear of every enabled stack (for network-wide thresholds)."""
        out: dict[str, ModalityStats] = {}
        for stack in stacks:
            store = self._capture(stack)
            hiddens = [store[i].hidden for i in range(len(store))]
            for bi, block in enumerate(stack.blocks):
                linears = stack.linears(block)
                collector, _, outs = self._calibrate(stack, block, linears, store, keep_outputs=True,
                                                     stats_only=True)
                for name, st in collector.stats.items():
                    out[f"{stack.name}.{bi}.{name}"] = st
                for i in range(len(store)):
                    c = store[i]
                    c.hidden = outs[i]
                    store[i] = c
            del hiddens
            store.close()
        return out

    def _check_groups(self, stack: BlockStack, weight_spec) -> None:
        """A weight group size that does not divide a layer's input width is an error unless allowed."""
        s = self.recipe.stacks.get(stack.name)
        wargs = (s.weights if s is not None and s.weights is not None else None) or self.recipe.weights
        if weight_spec.granularity != "group" or wargs.allow_partial_groups:
            return
        bad = sorted({lin.in_features for lin in stack.linears(stack.blocks[0]).values()
                      if lin.in_features % weight_spec.group_size})
        if bad:
            from .recipe import RecipeError
            raise RecipeError(
                f"weights.group_size {weight_spec.group_size} does not divide the input width(s) {bad} of stack "
                f"{stack.name!r}; choose a group size that divides them (e.g. 64 or 32) or set "
                "weights.allow_partial_groups: true")

    def _run_stack(self, stack: BlockStack, state: dict, log_file) -> None:
        weight_spec, act = self.recipe.stack_formats(stack.name)
        self._check_groups(stack, weight_spec)
        done = {b for s, b in self.resume.done if s == stack.name} if self.resume is not None else set()
        for bi in sorted(done):        # blocks finished before an interruption: restore, don't recompute
            saved = self.resume.block_modules(stack.name, bi)
            if isinstance(saved, nn.Module):       # the whole block: folded norms and biases come back too
                self._replace_block(stack, bi, saved)
            else:                                  # checkpoints written before whole blocks were saved
                for name, mod in saved.items():
                    stack.blocks[bi].set_submodule(name, mod)
        if done and len(done) == len(stack.blocks):
            return
        if done:
            store = ActivationStore(self.recipe.offload)
            for item in self.resume.activations():
                store.append(item)
        else:
            store = self._capture(stack)
        bar = tqdm(total=len(stack.blocks), initial=len(done), desc=f"quantize {stack.name}", unit="block",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            for bi, block in enumerate(stack.blocks):
                if bi in done:
                    continue
                tb = time.time()
                linears = stack.linears(block)
                for suffix in self.recipe.ignore:
                    linears = {n: m for n, m in linears.items() if not n.endswith(suffix)}
                groups = self._groups(stack, linears)
                fp_outs = None
                linear_reports: dict = {}
                for gi, group in enumerate(groups):
                    collector, sampler, outs = self._calibrate(stack, block, group, store, keep_outputs=gi == 0)
                    if gi == 0:
                        fp_outs = outs
                    usable = self._check_empty(stack, bi, collector.stats, group)
                    ctx = BlockContext(stack.name, bi, block, usable, collector.stats, weight_spec, act, sampler,
                                       rerun=None, global_state=state,
                                       weight_quantizers=self._weight_quantizers(collector, usable, weight_spec))
                    ctx.rerun = lambda observers=(), _b=block: self._rerun(_b, store, observers)
                    replacements = self.method.quantize_block(ctx) if usable else {}
                    for name, qlin in replacements.items():
                        block.set_submodule(name, qlin)
                        st = collector.stats[name]
                        linear_reports[name] = {"module": qlin.extra_repr(), **ctx.report.get(name, {}),
                                                "tokens": st.count, "modalities": st.modalities,
                                                "stats": st.summary()}
                        self.report.channels[f"{stack.name}.{bi}.{name}"] = {
                            **channel_arrays(st), **ctx.arrays.get(name, {})}
                    del collector, sampler
                rel = self._propagate(block, store, fp_outs)
                release_dequantized_weights(block)
                rec = LayerRecord(stack.name, bi, linear_reports, rel, time.time() - tb, peak_rss_mb())
                self.report.records.append(rec)
                if log_file:
                    self._log(log_file, json.dumps(rec.__dict__) + "\n")
                if self.resume is not None:
                    self.report.seconds = self._elapsed()
                    self.resume.save_block(stack.name, bi, block, [store[i] for i in range(len(store))],
                                           self.report)
                bar.set_postfix(err=f"{rel.get(ALL, float('nan')):.3g}")
                bar.update(1)
        finally:
            bar.close()
            store.close()

    def _replace_block(self, stack: BlockStack, index: int, block: nn.Module) -> None:
        """Put a checkpointed block where block ``index`` of ``stack`` sits in the model."""
        old = stack.blocks[index]
        name = self.module_names.get(id(old))
        if name is None:
            raise RuntimeError(f"cannot find block {index} of stack {stack.name!r} in the model")
        self.model.set_submodule(name, block)
        stack.blocks[index] = block
        self.module_names.update({id(m): f"{name}.{n}" if n else name for n, m in block.named_modules()})

    def _weight_quantizers(self, collector, linears, spec) -> dict:
        """GPTQ weight quantizers bound to each linear's Hessian (empty for round-to-nearest)."""
        if collector.hessian is None:
            return {}
        from ..methods.gptq import folded_hessian, gptq_quantize
        g = self.recipe.gptq

        def make(name):
            h = collector.hessian.hessian(name)

            def quantizer(w, fold_scale, perm=None):
                return gptq_quantize(w, folded_hessian(h, fold_scale, perm), spec, damp=g.damp,
                                     block_size=g.block_size, act_order=g.act_order)
            return quantizer
        return {name: make(name) for name in linears}

    def _groups(self, stack: BlockStack, linears: dict[str, nn.Module]) -> list[dict[str, nn.Module]]:
        if not self.recipe.sequential or not stack.sequential_groups:
            return [linears]
        groups, seen = [], set()
        for suffixes in stack.sequential_groups:
            g = {n: m for n, m in linears.items() if any(n.endswith(s) for s in suffixes) and n not in seen}
            seen |= set(g)
            if g:
                groups.append(g)
        rest = {n: m for n, m in linears.items() if n not in seen}
        if rest:
            groups.append(rest)
        return groups

    def _rerun(self, block: nn.Module, store: ActivationStore, observers=()) -> list[torch.Tensor]:
        outs = []
        for i in range(len(store)):
            c = store[i]
            for obs in observers:
                if hasattr(obs, "current_ids"):
                    obs.current_ids = c.ids
            outs.append(self._run_block(block, c))
        return outs

    def _propagate(self, block: nn.Module, store: ActivationStore, fp_outs: list) -> dict[str, float]:
        """Run the quantized block; its outputs become the next block's inputs.

        Returns the mean per-token relative error ``mean_n ‖ŷ_n − y_n‖ / ‖y_n‖`` per modality. Per token, not
        ``‖Ŷ − Y‖_F / ‖Y‖_F``: a few tokens with massive activations (BOS, 1000× the others) would dominate the
        pooled norm and hide what every normalised token downstream sees."""
        num: dict[str, float] = {}
        den: dict[str, float] = {}
        for i in range(len(store)):
            c = store[i]
            yq = self._run_block(block, c)
            yf = fp_outs[i]
            if not torch.isfinite(yq).all():
                raise FloatingPointError(
                    f"the quantized block produced NaN/inf outputs (sample {i}); the method or its settings "
                    "produced an invalid quantizer — check the layer log")
            d2 = (yq - yf).float().pow(2).reshape(-1, yq.shape[-1]).sum(-1)
            f2 = yf.float().pow(2).reshape(-1, yf.shape[-1]).sum(-1)
            ids = c.ids.reshape(-1)
            if ids.numel() != d2.numel():
                ids = torch.zeros(d2.numel(), dtype=torch.int8)
            for label, sel in [(ALL, ids >= 0)] + [(m.label, ids == int(m)) for m in Modality]:
                if bool(sel.any()):
                    rel = (d2[sel] / f2[sel].clamp(min=1e-30)).sqrt()
                    num[label] = num.get(label, 0.0) + float(rel.sum())
                    den[label] = den.get(label, 0.0) + float(sel.sum())
            c.hidden = yq
            store[i] = c
        return {k: num[k] / max(den[k], 1e-30) for k in num}


def release_dequantized_weights(block: nn.Module) -> int:
    """Drop the fp32 dequantized-weight caches of the block's ``QuantLinear`` modules; returns the bytes freed.

    A quantized linear caches ``W_q`` in fp32 on its first forward — as large as the fp32 weight it replaced.
    The pipeline never runs a finished block again, so keeping the caches of all finished blocks would hold a
    second fp32 copy of every quantized weight at the end of the run (for Qwen2.5-0.5B: 1.4 GB on top of the
    int8 codes). The cache is rebuilt lazily on the next forward (evaluation, serving).
    """
    return sum(m.release_cache() for m in block.modules() if isinstance(m, QuantLinear))


def channel_arrays(stats: ModalityStats) -> dict[str, torch.Tensor]:
    """Per-channel arrays of one layer for reports: absmax, mean |x| and kurtosis, pooled and per modality."""
    out = {}
    for label in [ALL, *stats.modalities]:
        st = stats[label]
        if st.count < 2:
            continue
        out[f"absmax.{label}"] = st.absmax
        out[f"mean_abs.{label}"] = st.mean_abs
        out[f"kurtosis.{label}"] = st.kurtosis
    return out


def count_quantized(model: nn.Module) -> int:
    return sum(isinstance(m, QuantLinear) for m in model.modules())


def environment_versions() -> dict[str, str]:
    import platform

    import transformers

    from .. import __version__
    return {"morphoquant": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": str(torch.get_num_threads()),
            "pid": str(os.getpid())}

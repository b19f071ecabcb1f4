"""Helpers for the method tests: run a recipe on a tiny model through the real layer-wise pipeline."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

try:  # the package may not be installed in the venv: fall back to the src layout
    import morphoquant  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

# registration of the baseline methods (until morphoquant.methods imports them itself)
from morphoquant.methods import awq, gptq, mbq, mquant, osplus, quarot, smoothquant  # noqa: F401


@torch.no_grad()
def randomize_norms(model: torch.nn.Module, seed: int = 0, outliers: int = 2, outlier_gain: float = 8.0) -> None:
    """Non-trivial norm weights (γ ∈ [0.5, 1.5], a few channels × ``outlier_gain``: activation outliers) and
    LayerNorm biases, so folds and migrations are actually exercised."""
    gen = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not (type(m).__name__.endswith(("RMSNorm", "LayerNorm")) or isinstance(m, torch.nn.LayerNorm)):
            continue
        if not isinstance(w, torch.Tensor) or w.dim() != 1:
            continue
        g = torch.rand(w.shape, generator=gen) + 0.5
        if outliers:
            g[torch.randperm(w.numel(), generator=gen)[:outliers]] *= outlier_gain
        w.mul_(g)
        b = getattr(m, "bias", None)
        if isinstance(b, torch.Tensor):
            b.add_(0.3 * torch.randn(b.shape, generator=gen))


def model_output(model, sample, adapter):
    from morphoquant.methods.mquant import modality_context
    try:
        ids = adapter.decoder_modality_ids(sample)
    except Exception:  # noqa: BLE001 — encoder-only models have no decoder sequence
        ids = None
    with torch.no_grad(), modality_context(ids):
        out = model(**sample)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def output_mask(sample, out):
    mask = sample.get("attention_mask", sample.get("decoder_attention_mask"))
    if "decoder_attention_mask" in sample:
        mask = sample["decoder_attention_mask"]
    if mask is None or mask.shape != out.shape[:-1]:
        return torch.ones(out.shape[:-1], dtype=torch.bool)
    return mask.bool()


def quantized_error(arch: str, recipe: dict, *, n_samples: int = 1, prepare=None, seed: int = 0):
    """(masked relative output error of the quantized model vs FP, report, model) for ``recipe`` on ``arch``."""
    from morphoquant.api import quantize
    from morphoquant.models import get_adapter
    from morphoquant.models.tiny import tiny_model
    from morphoquant.pipeline.recipe import parse_recipe

    model, factory = tiny_model(arch, seed=seed)
    if prepare is not None:
        prepare(model)
    adapter = get_adapter(model)
    calib = [factory(seed=i) for i in range(n_samples)]
    evals = factory(seed=100)
    ref = model_output(model, evals, adapter)
    full = {"calibration": {"modalities": [], "max_rows_per_layer": 256}, **recipe}
    report = quantize(model, parse_recipe(full), calib, progress=False)
    out = model_output(model, evals, adapter)
    mask = output_mask(evals, out)
    err = float((out - ref)[mask].norm() / ref[mask].norm())
    return err, report, model


@pytest.fixture
def modality_hook(monkeypatch):
    """What the pipeline must do for modality-scaled layers: run every block forward inside
    ``modality_context(ids)`` (the proposed one-line change to ``LayerwiseRunner._run_block``)."""
    from morphoquant.methods.mquant import modality_context
    from morphoquant.pipeline.runner import LayerwiseRunner

    orig = LayerwiseRunner._run_block

    def run_block(block, c, hidden=None):
        with modality_context(c.ids):
            return orig(block, c, hidden)

    monkeypatch.setattr(LayerwiseRunner, "_run_block", staticmethod(run_block))
    return run_block


def layer_reports(report) -> dict:
    return {f"{r.stack}.{r.block}.{k}": v for r in report.records for k, v in r.linears.items()}


@pytest.fixture
def run_recipe():
    """``run_recipe(arch, recipe, n_samples=1, prepare=None) -> (error, report, model)``."""
    return quantized_error


@pytest.fixture
def perturb_norms():
    return randomize_norms


@pytest.fixture
def forward_output():
    """``forward_output(model, sample, adapter)``: logits (or last hidden state), inside the modality context."""
    return model_output


def fold_only(method_cls, arch: str, options: dict | None = None, prepare=randomize_norms):
    """Run only ``method_cls.transform_block`` on every block of every stack (nothing quantized) and return
    (FP output before, output after, number of changed norm parameters)."""
    from morphoquant.models import get_adapter
    from morphoquant.models.tiny import tiny_model
    from morphoquant.pipeline.recipe import parse_recipe
    from morphoquant.pipeline.runner import LayerwiseRunner

    class FoldOnly(method_cls):
        def quantize_block(self, ctx):
            self.transform_block(ctx)
            return {}

    model, factory = tiny_model(arch)
    if prepare is not None:
        prepare(model)
    adapter = get_adapter(model)
    sample = factory(seed=7)
    ref = model_output(model, sample, adapter)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    stacks = adapter.stacks()
    recipe = parse_recipe({"method": method_cls.name, "weights": {"bits": 8, "granularity": "channel"},
                           "activations": {"bits": 8, "granularity": "token"},
                           "calibration": {"modalities": [], "max_rows_per_layer": 256},
                           "stacks": {s.name: {"enabled": True} for s in stacks}})
    LayerwiseRunner(model, stacks, recipe, [factory(seed=0)], progress=False,
                    method=FoldOnly(options or {})).run()
    out = model_output(model, sample, adapter)
    changed = sum(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    return ref, out, changed


@pytest.fixture
def run_fold_only():
    return fold_only


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models are latency-bound: intra-op threads only add synchronisation (10x slower on a shared
    2-core machine). Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

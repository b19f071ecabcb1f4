"""The Python API: ``quantize(model, recipe, calib_samples)``.

This is the top of the library stack (it may import every layer below it).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from .layers.quant_linear import has_modality_quantizers
from .models import get_adapter
from .pipeline.recipe import Recipe, load_recipe
from .pipeline.runner import CalibrationDataError, LayerwiseRunner, QuantizationReport
from .pipeline.stack import Sample
from .statistics import Modality

__all__ = ["Recipe", "check_calibration_modalities", "load_recipe", "quantize"]

# sample keys that prove a modality is present even before the decoder ids are computed
_MODALITY_KEYS = {"image": ("pixel_values",), "video": ("pixel_values_videos",),
                  "audio": ("input_features",), "text": ("input_ids", "decoder_input_ids")}


def check_calibration_modalities(adapter, samples: list[Sample], wanted: list[str]) -> set[str]:
    """Modalities present in ``samples``; raises :class:`CalibrationDataError` naming any wanted one missing."""
    present: set[str] = set()
    for s in samples:
        for label, keys in _MODALITY_KEYS.items():
            if any(k in s for k in keys):
                present.add(label)
        # encoder-only models have no decoder sequence: their modalities come from the input keys above
        with contextlib.suppress(Exception):
            ids = adapter.decoder_modality_ids(s)
            present |= {m.label for m in Modality if bool((ids == int(m)).any())}
    missing = [m for m in wanted if m not in present]
    if missing:
        raise CalibrationDataError(
            f"the recipe asks for calibration modalities {wanted} but the calibration data has no "
            f"{', '.join(missing)} tokens (present: {', '.join(sorted(present)) or 'none'}); add samples with "
            f"{' / '.join(missing)} inputs or drop them from calibration.modalities")
    return present


def check_sequence_lengths(model: nn.Module, samples: list[Sample]) -> None:
    """Token sequences longer than the model's position limit are an error, not a silent wrap-around."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", cfg)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "max_target_positions", None)
    if not limit:
        return
    for i, s in enumerate(samples):
        for key in ("input_ids", "decoder_input_ids"):
            if key in s and s[key].shape[-1] > limit:
                raise CalibrationDataError(
                    f"calibration sample {i} has {s[key].shape[-1]} tokens in {key}, more than the model's limit "
                    f"of {limit}; use a shorter calibration.seq_len (--seq-len)")


def quantize(model: nn.Module, recipe: Recipe | str | Path, calib_samples: list[Sample], *,
             log_path: str | Path | None = None, progress: bool = True,
             resume_dir: str | Path | None = None) -> QuantizationReport:
    """Quantize ``model`` in place with ``recipe`` (a :class:`Recipe`, a built-in name or a YAML path).

    ``calib_samples`` are dicts of model keyword arguments (``input_ids``/``attention_mask``, ``pixel_values``,
    ``input_features`` ...). Returns the per-layer report; the model's linears are replaced by ``QuantLinear``.
    With ``resume_dir`` a checkpoint is written after every block; calling again with the same model, recipe
    and samples after an interruption resumes from it and gives the same result as an uninterrupted run.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if not calib_samples:
        raise CalibrationDataError("the calibration set is empty: pass at least one sample")
    adapter = get_adapter(model)
    check_calibration_modalities(adapter, calib_samples, recipe.calibration.modalities)
    check_sequence_lengths(model, calib_samples)
    model.eval()
    with torch.no_grad():
        runner = LayerwiseRunner(model, adapter.stacks(), recipe, calib_samples, log_path=log_path,
                                 progress=progress, resume_dir=resume_dir)
        report = runner.run()
    if has_modality_quantizers(model):
        adapter.attach_modality_context()
    return report


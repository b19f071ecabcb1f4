"""Fixtures for the report tests: a real run directory quantized from the tiny Qwen2.5-Omni thinker.

``build_tiny_run(out)`` writes what ``morphoquant quantize --out OUT -r rtn-w4a4 -r morpho`` writes (per
recipe ``report.json``, ``channels.safetensors``, ``layers.jsonl``, ``recipe.yaml``, ``run.json``;
``summary.json`` at the top) from the tiny random omni model, with text + image + audio calibration tokens:

* ``rtn-w4a4`` quantizes the text decoder only (the recipe default), no method arrays;
* ``morpho`` also enables the vision and audio towers (single-modality stacks) and writes the dispersion /
  outlier / clip arrays.

Its "task" is a cheap fidelity check on a held-out sample (top-1 agreement and logit NMSE against FP).
Built once per test session (~10–40 s on a loaded 2-core CPU); tests copy it before changing anything.
The FP and quantized last hidden states of the held-out sample are returned for the embedding plot.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest

try:  # the package may not be installed in the venv: fall back to the src layout
    import morphoquant  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

# cheap but real settings: small weight groups for the 64/128-wide tiny layers, a coarse clip grid
RECIPES = {
    "rtn-w4a4": {"weights": {"group_size": 16}},
    "morpho": {
        "weights": {"group_size": 16},
        "stacks": {"vision": {"enabled": True}, "audio": {"enabled": True}},
        "options": {"grid_points": 6, "cos_sweeps": 1},
        "calibration": {"max_rows_per_layer": 128},
    },
}


def _fidelity(model, reference, sample) -> dict:
    import torch

    with torch.no_grad():
        lq = model(**sample).logits.float()
        lf = reference(**sample).logits.float()
    keep = sample["attention_mask"].bool()
    lq, lf = lq[keep], lf[keep]
    return {
        "top1_agree": float((lq.argmax(-1) == lf.argmax(-1)).float().mean()),
        "logit_nmse": float((lq - lf).pow(2).sum() / lf.pow(2).sum()),
        "eval_tokens": int(keep.sum()),
    }


def _hidden(model, sample):
    import torch

    with torch.no_grad():
        out = model(**sample, output_hidden_states=True)
    return out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1])


def build_tiny_run(out: Path, recipes: dict | None = None) -> dict:
    """Write a run directory to ``out``.

    Returns ``{"fp_hidden", "q_hidden", "modality_ids"}`` of the held-out sample (for the embedding plot).
    """
    import torch
    from safetensors.torch import save_file

    from morphoquant import quantize
    from morphoquant.models import get_adapter
    from morphoquant.models.tiny import tiny_model
    from morphoquant.pipeline.recipe import load_recipe

    recipes = recipes or RECIPES
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, factory = tiny_model("qwen2.5-omni-thinker")
    calib = [factory(seed=0)]
    held_out = factory(seed=7)
    task = {"task": "tiny-fidelity", "metric": "top1_agree", "eval_size": 1, "seq_len": None}
    fp = {"top1_agree": 1.0, "logit_nmse": 0.0, "eval_tokens": int(held_out["attention_mask"].sum())}
    rows = [{"recipe": "fp32", "top1_agree": 1.0, "seconds_eval": 0.01}]
    extra: dict = {}
    for name, overrides in recipes.items():
        recipe = load_recipe(name, overrides)
        qmodel = copy.deepcopy(model)
        rdir = out / recipe.name
        rdir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        rep = quantize(qmodel, recipe, calib, log_path=rdir / "layers.jsonl", progress=False)
        m = _fidelity(qmodel, model, held_out)
        row = {"recipe": recipe.name, "calib_seconds": rep.seconds, "peak_rss_mb": rep.peak_rss_mb}
        effs = [
            (info["channels"], info["effective_bits"], info["outlier_fraction"])
            for rec in rep.records
            for info in rec.linears.values()
            if "effective_bits" in info
        ]
        if effs:
            tot = sum(c for c, _, _ in effs)
            row["effective_act_bits"] = sum(c * e for c, e, _ in effs) / tot
            row["outlier_channel_share"] = sum(c * f for c, _, f in effs) / tot
        row.update(
            {"top1_agree": m["top1_agree"], "seconds_eval": 0.01, "x_fp": m["top1_agree"], "metrics": m}
        )
        rows.append(row)
        (rdir / "recipe.yaml").write_text(recipe.to_yaml())
        (rdir / "report.json").write_text(
            json.dumps(
                {"row": row, "fp": fp, "quantization": rep.to_dict(), "task": task}, indent=2, default=str
            )
        )
        save_file(
            {
                f"{layer}|{k}": v.detach().float().contiguous()
                for layer, arrs in rep.channels.items()
                for k, v in arrs.items()
            },
            str(rdir / "channels.safetensors"),
        )
        (rdir / "run.json").write_text(
            json.dumps(
                {
                    "model": "tiny:qwen2.5-omni-thinker",
                    "recipe": recipe.name,
                    "versions": {"torch": torch.__version__},
                    "command": [],
                }
            )
        )
        if recipe.method == "morpho":
            ids = get_adapter(model).decoder_modality_ids(held_out).reshape(-1)
            extra = {
                "fp_hidden": _hidden(model, held_out),
                "q_hidden": _hidden(qmodel, held_out),
                "modality_ids": ids,
            }
        del qmodel
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    return extra


@pytest.fixture(scope="session")
def tiny_run_src(tmp_path_factory):
    """(path, hidden states) of the session's tiny run directory; do not modify it (use ``tiny_run``)."""
    src = tmp_path_factory.mktemp("tiny-run-src") / "run"
    extra = build_tiny_run(src)
    return src, extra


@pytest.fixture
def tiny_run(tiny_run_src, tmp_path) -> Path:
    """A fresh, writable copy of the tiny run directory."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run_src[0], dst)
    return dst


@pytest.fixture
def tiny_hidden(tiny_run_src) -> dict:
    return tiny_run_src[1]

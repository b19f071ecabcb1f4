"""``morphoquant.report``: one self-contained, offline HTML page (+ PNGs) for a ``quantize``/``compare`` run.

>>> from morphoquant.report import build_report
>>> build_report("runs/omni")            # -> runs/omni/report/index.html
>>> embedding_plot(fp_h, q_h, ids, "runs/omni/embeddings.png")   # optional, needs the models; then rebuild

``run_dir`` is what ``morphoquant quantize --out DIR`` writes (one sub-directory per recipe holding
``report.json``, ``channels.safetensors``, ``recipe.yaml``, ``run.json``; ``summary.json`` at the top;
``compare.json`` from ``morphoquant compare``), or a single recipe directory. Only ``report.json`` is required
(at least one); everything else that is missing or unreadable is shown as a note in the page. The page has
no network reference at all (no CDN, fonts or scripts): figures are PNG files next to ``index.html``,
referenced relatively, or embedded as ``data:`` URIs with ``embed_images=True``.

The report is written atomically: it is rendered into a temporary directory beside the target, which then
replaces the previous report directory, so a failed or interrupted build leaves the previous report intact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .plots import embedding_plot  # plots imports ReportError from here lazily (inside functions)

__all__ = ["RecipeRun", "ReportError", "RunData", "build_report", "embedding_plot", "load_run"]

log = logging.getLogger("morphoquant.report")

REPORT_DIRNAME = "report"


class ReportError(ValueError):
    """The report cannot be built (no run directory, no ``report.json``, output not writable ...)."""


@dataclass
class RecipeRun:
    """One recipe's outputs, as read from ``<run_dir>/<recipe>/``."""

    name: str
    path: Path
    report: dict
    channels: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def quantization(self) -> dict:
        q = self.report.get("quantization")
        return q if isinstance(q, dict) else {}

    @property
    def layers(self) -> list[dict]:
        return [rec for rec in self.quantization.get("layers") or [] if _valid_layer(rec)]

    @property
    def row(self) -> dict:
        r = self.report.get("row")
        return r if isinstance(r, dict) else {}

    @property
    def method(self) -> str:
        return str(self.recipe.get("method") or "")

    def linears(self) -> list[tuple[tuple[str, int, str], dict]]:
        """((stack, block, linear), info) of every quantized linear, in execution order."""
        return [
            ((str(rec["stack"]), int(rec["block"]), str(name)), info)
            for rec in self.layers
            for name, info in rec["linears"].items()
            if isinstance(info, dict)
        ]

    def arrays(self, key: tuple[str, int, str]) -> dict[str, np.ndarray]:
        return self.channels.get(f"{key[0]}.{key[1]}.{key[2]}", {})

    @property
    def has_method_arrays(self) -> bool:
        return any(
            "outlier_mask" in a or "dispersion" in a or "clip_ratio" in a for a in self.channels.values()
        )


@dataclass
class RunData:
    """Everything the page shows, read from a run directory."""

    root: Path
    runs: list[RecipeRun]
    summary: list[dict] | None = None
    compare: list[dict] | None = None
    embeddings: list[tuple[str, Path]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _valid_layer(rec) -> bool:
    return (
        isinstance(rec, dict)
        and "stack" in rec
        and isinstance(rec.get("linears"), dict)
        and isinstance(rec.get("block"), (int, float, str))
        and str(rec.get("block")).lstrip("-").isdigit()
    )


def _read_json(path: Path, what: str, notes: list[str]):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        notes.append(f"{what} could not be read ({type(e).__name__}: {e})")
        return None


def _read_rows(path: Path, what: str, notes: list[str]) -> list[dict] | None:
    if not path.is_file():
        return None
    data = _read_json(path, what, notes)
    if data is None:
        return None
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        data = data["rows"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        notes.append(f"{what} is not a list of table rows; ignored")
        return None
    return data


def _read_channels(path: Path, notes: list[str]) -> dict[str, dict[str, np.ndarray]]:
    if not path.is_file():
        notes.append(
            "no channels.safetensors: per-channel plots fall back to the layer summaries in report.json"
        )
        return {}
    try:
        from safetensors.numpy import load_file

        flat = load_file(str(path))
    except Exception as e:  # noqa: BLE001 — any corrupt file is a note, not a crash
        notes.append(
            f"channels.safetensors could not be read ({type(e).__name__}: {e}); per-channel plots "
            "fall back to the layer summaries"
        )
        return {}
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in flat.items():
        layer, sep, key = name.rpartition("|")
        if sep:
            out.setdefault(layer, {})[key] = np.asarray(arr).reshape(-1)
    return out


def _load_recipe_dir(path: Path, notes: list[str]) -> RecipeRun | None:
    own: list[str] = []
    report = _read_json(path / "report.json", f"recipe {path.name}: report.json", notes)
    if report is None:
        return None
    if not isinstance(report, dict):
        notes.append(f"recipe {path.name}: report.json is not a JSON object; skipped")
        return None
    recipe: dict = {}
    if (path / "recipe.yaml").is_file():
        try:
            import yaml

            recipe = yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8")) or {}
            if not isinstance(recipe, dict):
                recipe = {}
        except Exception as e:  # noqa: BLE001
            own.append(f"recipe.yaml could not be read ({type(e).__name__}: {e})")
    run = {}
    if (path / "run.json").is_file():
        run = _read_json(path / "run.json", "run.json", own) or {}
        run = run if isinstance(run, dict) else {}
    q = report.get("quantization")
    row = report.get("row") if isinstance(report.get("row"), dict) else {}
    name = (
        row.get("recipe")
        or (q.get("recipe") if isinstance(q, dict) else None)
        or recipe.get("name")
        or path.name
    )
    rr = RecipeRun(name=str(name), path=path, report=report, recipe=recipe, run=run, notes=own)
    rr.channels = _read_channels(path / "channels.safetensors", own)
    if not isinstance(q, dict):
        own.append("report.json has no 'quantization' section: no per-layer plots for this recipe")
    else:
        raw = q.get("layers") or []
        bad = sum(1 for r in raw if not _valid_layer(r))
        if bad:
            own.append(f"{bad} malformed layer record(s) in report.json ignored")
        if not rr.layers:
            own.append("report.json lists no quantized layers")
    return rr


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory (see the module docstring).

    Raises :class:`ReportError` when there is nothing to show.
    """
    root = Path(run_dir)
    if not root.exists():
        raise ReportError(f"run directory {root} does not exist")
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory (expected the --out directory of morphoquant quantize)")
    notes: list[str] = []
    if (root / "report.json").is_file():
        dirs = [root]
    else:
        try:
            dirs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "report.json").is_file())
        except OSError as e:
            raise ReportError(f"cannot list {root}: {e}") from None
        partial = sorted(
            p.name
            for p in root.iterdir()
            if p.is_dir() and not (p / "report.json").exists() and (p / "layers.jsonl").exists()
        )
        if partial:
            notes.append(f"incomplete recipe run(s) without report.json (interrupted?): {', '.join(partial)}")
    if not dirs:
        raise ReportError(
            f"no report.json in {root} or its sub-directories: is it the --out directory of "
            "`morphoquant quantize`?"
        )
    summary = _read_rows(root / "summary.json", "summary.json", notes)
    compare = _read_rows(root / "compare.json", "compare.json", notes)
    runs = [r for r in (_load_recipe_dir(d, notes) for d in dirs) if r is not None]
    if not runs:
        raise ReportError(f"none of the report.json files under {root} could be read: " + "; ".join(notes))
    if summary:  # show recipes in the order they were run
        order = {str(r.get("recipe")): i for i, r in enumerate(summary)}
        runs.sort(key=lambda r: order.get(r.name, len(order)))
    embeddings = []
    if (root / "embeddings.png").is_file():
        embeddings.append(("", root / "embeddings.png"))
    for r in runs:
        if r.path != root and (r.path / "embeddings.png").is_file():
            embeddings.append((r.name, r.path / "embeddings.png"))
    return RunData(root=root, runs=runs, summary=summary, compare=compare, embeddings=embeddings, notes=notes)


def build_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    embed_images: bool = False,
    title: str | None = None,
) -> Path:
    """Write ``<out_dir>/index.html`` (default ``<run_dir>/report/``) and its PNGs; returns the HTML path.

    ``embed_images=True`` embeds the figures as ``data:`` URIs (one file to mail around). Raises
    :class:`ReportError` for a missing run directory, no readable ``report.json``, or an output directory
    that cannot be written or holds something else than a previous report.
    """
    from .html import render_page

    data = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else data.root / REPORT_DIRNAME
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "index.html").exists())):
        raise ReportError(
            f"{out} exists and is not a previous report directory; choose another output directory"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out.parent))
    except OSError as e:
        raise ReportError(f"cannot write the report next to {out}: {e}") from None
    try:
        page = render_page(data, tmp, embed_images=embed_images, title=title)
        (tmp / "index.html").write_text(page, encoding="utf-8")
        os.chmod(tmp, 0o755)
        old = None
        if out.exists():
            old = out.parent / f"{tmp.name}-old"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ReportError(f"cannot write the report to {out}: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("report written to %s", out / "index.html")
    return out / "index.html"

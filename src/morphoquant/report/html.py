"""The report page: data shaping for the figures, tables, notes and the HTML/CSS (inline, nothing remote).

``render_page(data, out_dir)`` writes the figures into ``out_dir`` and returns the page's HTML. Every section
is optional: a figure whose data is missing (an RTN recipe has no outlier/clip arrays, a run without
``summary.json`` ...) becomes a short note saying why, and a figure that fails to draw becomes a note with the
error instead of aborting the report.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from . import RecipeRun, RunData, plots

log = logging.getLogger("morphoquant.report")

MODS = plots.MODALITY_ORDER
Key = tuple[str, int, str]

# ------------------------------------------------------------------------------------------- formatting

_LABELS = {
    "recipe": "Recipe",
    "x_fp": "× FP",
    "effective_act_bits": "Eff. act. bits",
    "outlier_channel_share": "16-bit channels",
    "calib_seconds": "Calib. s",
    "peak_rss_mb": "Peak RSS MB",
    "seconds_eval": "Eval s",
    "seconds": "s",
    "eval_tokens": "Eval tokens",
}
_PERCENT = {"outlier_channel_share", "outlier_fraction", "bypass_element_fraction"}
_FIRST = ["recipe", "method"]
_AFTER_METRIC = [
    "x_fp",
    "effective_act_bits",
    "outlier_channel_share",
    "calib_seconds",
    "peak_rss_mb",
    "seconds_eval",
]


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def fmt(v, key: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if key in _PERCENT:
            return f"{100 * v:.2f} %"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        if len(v) <= 4 and all(isinstance(x, (int, float)) for x in v):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return f"{len(v)} values"
    if isinstance(v, dict):
        return f"{len(v)} entries"
    return str(v)


_LOWER = {"ppl", "perplexity", "wer", "cer", "mse", "nmse", "rmse", "mae", "error", "err", "loss", "kl",
          "seconds", "s", "rss", "mb", "latency", "time"}
_HIGHER = {"acc", "accuracy", "agree", "agreement", "f1", "bleu", "cider", "rouge", "score", "cos", "cosine",
           "exact", "match", "em", "top1", "top5", "auc", "map"}


def direction(metric: str) -> str | None:
    """'lower' / 'higher' when a word of the metric name says which is better (``wiki_ppl``, ``vqa_acc``),
    else None."""
    words = set(re.split(r"[^a-z0-9]+", metric.lower()))
    if words & _LOWER:
        return "lower"
    if words & _HIGHER:
        return "higher"
    return None


def _scalar(v) -> bool:
    return (
        v is None
        or isinstance(v, (int, float, str, bool))
        or (isinstance(v, (list, tuple)) and len(v) <= 4 and all(isinstance(x, (int, float)) for x in v))
    )


def table(rows: list[dict], *, first: Iterable[str] = (), best: Iterable[str] = (), cls: str = "") -> str:
    """An HTML table over the union of the rows' scalar keys (``first`` keys first); ``best`` columns get
    their best value marked when the metric's direction is known from its name."""
    cols: list[str] = []
    for k in list(first):
        if any(k in r for r in rows) and k not in cols:
            cols.append(k)
    for r in rows:
        for k, v in r.items():
            if k not in cols and _scalar(v) and not isinstance(v, (dict,)):
                cols.append(k)
    best_idx: dict[str, int] = {}
    for k in best:
        d = direction(k)
        vals = [
            (i, r.get(k))
            for i, r in enumerate(rows)
            if isinstance(r.get(k), (int, float))
            and not isinstance(r.get(k), bool)
            and str(r.get("recipe")) not in ("fp32", "fp16", "bf16", "fp")
            and math.isfinite(r.get(k))
        ]
        if d and len(vals) > 1:
            best_idx[k] = (min if d == "lower" else max)(vals, key=lambda t: t[1])[0]
    head = "".join(f'<th title="{esc(c)}">{esc(_LABELS.get(c, c))}</th>' for c in cols)
    body = []
    for i, r in enumerate(rows):
        cells = []
        for c in cols:
            v = r.get(c)
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            klass = ["num"] if num else []
            if best_idx.get(c) == i:
                klass.append("best")
            cells.append(f'<td class="{" ".join(klass)}">{esc(fmt(v, c))}</td>')
        rcls = ' class="ref"' if str(r.get("recipe")) in ("fp32", "fp16", "bf16", "fp") else ""
        body.append(f"<tr{rcls}>{''.join(cells)}</tr>")
    return (
        f'<div class="tablewrap"><table class="{cls}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def note(text: str, kind: str = "info") -> str:
    return f'<p class="note {kind}">{esc(text)}</p>'


# ------------------------------------------------------------------------------------------- data shaping


def _stack_order(runs: list[RecipeRun]) -> list[str]:
    order: list[str] = []
    for r in sorted(runs, key=lambda r: -len({k[0] for k, _ in r.linears()})):
        stacks = [s for s in (r.quantization.get("stacks") or []) if isinstance(s, str)]
        stacks += [k[0] for k, _ in r.linears()]
        for s in stacks:
            if s not in order:
                order.append(s)
    return order


def union_keys(runs: list[RecipeRun]) -> list[Key]:
    stacks = _stack_order(runs)
    lin_rank: dict[tuple[str, str], int] = {}
    keys: set[Key] = set()
    for r in runs:
        for k, _ in r.linears():
            keys.add(k)
            lin_rank.setdefault((k[0], k[2]), len([1 for s, _ in lin_rank if s == k[0]]))
    return sorted(
        keys, key=lambda k: (stacks.index(k[0]) if k[0] in stacks else 99, k[1], lin_rank[(k[0], k[2])])
    )


def union_blocks(runs: list[RecipeRun]) -> list[tuple[str, int]]:
    stacks = _stack_order(runs)
    blocks = {(str(rec["stack"]), int(rec["block"])) for r in runs for rec in r.layers}
    return sorted(blocks, key=lambda b: (stacks.index(b[0]) if b[0] in stacks else 99, b[1]))


def _modalities(stats_list: Iterable[dict]) -> list[str]:
    seen = {m for st in stats_list if isinstance(st, dict) for m in st}
    real = [m for m in MODS if m != "all" and m in seen]
    return real or (["all"] if "all" in seen else [])


def activation_bands(run: RecipeRun) -> tuple[list[Key], dict, dict, bool]:
    """Keys, absmax bands and kurtosis per modality, and whether per-channel percentiles were available."""
    items = run.linears()
    keys = [k for k, _ in items]
    mods = _modalities(info.get("stats") for _, info in items)
    n = len(keys)
    bands: dict[str, dict[str, np.ndarray]] = {}
    kurt: dict[str, dict[str, np.ndarray]] = {}
    per_channel = False
    for m in mods:
        b = {q: np.full(n, np.nan) for q in ("p10", "p50", "p90", "max")}
        kd = {q: np.full(n, np.nan) for q in ("median", "max")}
        for i, (k, info) in enumerate(items):
            arr = run.arrays(k).get(f"absmax.{m}")
            st = (info.get("stats") or {}).get(m) or {}
            if arr is not None and arr.size:
                a = arr.astype(float)
                b["p10"][i], b["p50"][i], b["p90"][i] = np.percentile(a, [10, 50, 90])
                b["max"][i] = a.max()
                per_channel = True
            elif st.get("absmax_median_channel") is not None:
                med = float(st["absmax_median_channel"])
                b["p50"][i] = med
                if st.get("absmax_max_over_median") is not None:
                    b["max"][i] = med * float(st["absmax_max_over_median"])
            if st.get("kurtosis_median") is not None:
                kd["median"][i] = float(st["kurtosis_median"])
            if st.get("kurtosis_max") is not None:
                kd["max"][i] = float(st["kurtosis_max"])
        if np.isfinite(b["p50"]).any():
            if not np.isfinite(b["p10"]).any():
                del b["p10"], b["p90"]
            bands[m] = b
        if np.isfinite(kd["median"]).any() or np.isfinite(kd["max"]).any():
            kurt[m] = kd
    return keys, bands, kurt, per_channel


def rel_errors(runs: list[RecipeRun], blocks: list[tuple[str, int]]) -> dict[str, dict[str, np.ndarray]]:
    idx = {b: i for i, b in enumerate(blocks)}
    out: dict[str, dict[str, np.ndarray]] = {}
    for r in runs:
        per: dict[str, np.ndarray] = {}
        for rec in r.layers:
            rel = rec.get("rel_error")
            if not isinstance(rel, dict):
                continue
            i = idx[(str(rec["stack"]), int(rec["block"]))]
            for m, v in rel.items():
                if isinstance(v, (int, float)):
                    per.setdefault(str(m), np.full(len(blocks), np.nan))[i] = float(v)
        if per:
            out[r.name] = per
    return out


def _recipe_act_bits(run: RecipeRun, stack: str, info: dict) -> float | None:
    rec = run.recipe
    if rec:
        s = (rec.get("stacks") or {}).get(stack) or {}
        a = (s.get("activations") if isinstance(s, dict) else None) or rec.get("activations") or {}
        if isinstance(a, dict):
            return float(a.get("bits", 16))
    m = re.search(r"(?:^|[\s,])A(\d+)\b", str(info.get("module", "")))
    return float(m.group(1)) if m else None


def bit_budget(runs: list[RecipeRun], keys: list[Key]) -> dict[str, dict[str, np.ndarray]]:
    idx = {k: i for i, k in enumerate(keys)}
    out = {}
    for r in runs:
        frac, bits = np.full(len(keys), np.nan), np.full(len(keys), np.nan)
        for k, info in r.linears():
            i = idx[k]
            if isinstance(info.get("effective_bits"), (int, float)):
                bits[i] = float(info["effective_bits"])
                frac[i] = float(info.get("outlier_fraction") or 0.0)
            else:
                ab = _recipe_act_bits(r, k[0], info)
                if ab is not None:
                    bits[i] = ab
                    frac[i] = 1.0 if ab >= 16 else 0.0
        if np.isfinite(bits).any():
            out[r.name] = {"fraction": frac, "bits": bits}
    return out


def _name(k: Key) -> str:
    return f"{k[0]}.{k[1]}.{k[2]}"


def dispersion_panels(run: RecipeRun, limit: int = 4) -> list[dict]:
    cands = []
    for k, info in run.linears():
        a = run.arrays(k)
        if "dispersion" not in a:
            continue
        s = a["dispersion"].astype(float)
        loc = info.get("local_threshold")
        loc = float(loc) if isinstance(loc, (int, float)) else None
        glob = info.get("global_threshold")
        glob = float(glob) if isinstance(glob, (int, float)) else None
        mask = a.get("outlier_mask")
        ref = loc or glob or float(np.nanmean(s)) or 1.0
        cands.append(
            {
                "key": k,
                "name": _name(k),
                "scores": s,
                "mask": mask,
                "local": loc,
                "global": glob,
                "n_out": int(np.sum(mask > 0)) if mask is not None else 0,
                "peak": float(np.nanmax(s)) / ref if s.size and ref else 0.0,
            }
        )
    if not cands:
        return []
    chosen: list[dict] = []

    def add(c):
        if c not in chosen and len(chosen) < limit:
            chosen.append(c)

    add(max(cands, key=lambda c: (c["n_out"], c["peak"])))  # most outlier channels
    add(max(cands, key=lambda c: c["peak"]))  # most extreme channel vs its threshold
    add(cands[0])  # first quantized linear
    add(cands[-1])  # last one
    for c in sorted(cands, key=lambda c: -c["peak"]):
        add(c)
    pos = {id(c): i for i, c in enumerate(cands)}
    return sorted(chosen, key=lambda c: pos[id(c)])


def outlier_masks(run: RecipeRun) -> tuple[list[str], list[np.ndarray]]:
    names, masks = [], []
    for k, _ in run.linears():
        m = run.arrays(k).get("outlier_mask")
        if m is not None and m.size:
            names.append(_name(k))
            masks.append(m)
    return names, masks


def clip_groups(run: RecipeRun) -> dict[str, dict[str, np.ndarray]]:
    parts: dict[str, dict[str, list]] = {}
    for k, _ in run.linears():
        a = run.arrays(k)
        if "clip_ratio" not in a or "alpha" not in a:
            continue
        n = a["alpha"].size
        rng = a.get("absmax.all")
        if rng is None or rng.size != n:
            rng = np.full(n, np.nan)
        mask = a.get("outlier_mask")
        mask = (mask > 0) if mask is not None and mask.size == n else np.zeros(n, bool)
        g = parts.setdefault(k[0], {"ratio": [], "alpha": [], "range": [], "outlier": []})
        g["ratio"].append(a["clip_ratio"].astype(float))
        g["alpha"].append(a["alpha"].astype(float))
        g["range"].append(rng.astype(float))
        g["outlier"].append(mask)
    return {s: {k: np.concatenate(v) for k, v in g.items()} for s, g in parts.items()}


def loss_table(run: RecipeRun) -> list[dict]:
    acc: dict[str, list[tuple[float, float]]] = {}
    for _, info in run.linears():
        lbm = info.get("loss_by_modality")
        if not isinstance(lbm, dict):
            continue
        for m, d in lbm.items():
            if (
                isinstance(d, dict)
                and isinstance(d.get("before"), (int, float))
                and isinstance(d.get("after"), (int, float))
            ):
                acc.setdefault(m, []).append((float(d["before"]), float(d["after"])))
    rows = []
    for m in [m for m in MODS if m in acc] + [m for m in acc if m not in MODS]:
        b = np.array(acc[m])
        before, after = float(b[:, 0].mean()), float(b[:, 1].mean())
        rows.append(
            {
                "modality": m,
                "linears": len(b),
                "loss before search": before,
                "loss after search": after,
                "reduction": f"{100 * (1 - after / before):.1f} %" if before > 0 else "—",
            }
        )
    return rows


def method_summary(run: RecipeRun) -> dict:
    items = [info for _, info in run.linears()]
    outs = [info.get("outlier_channels") for info in items if isinstance(info.get("outlier_channels"), int)]
    chans = [info.get("channels") for info in items if isinstance(info.get("channels"), int)]
    ratios = [info.get("ratio_mean") for info in items if isinstance(info.get("ratio_mean"), (int, float))]
    floor = [
        info.get("ratio_at_floor") for info in items if isinstance(info.get("ratio_at_floor"), (int, float))
    ]
    row = {"recipe": run.name, "method": run.method or "—", "linears": len(items)}
    if outs:
        row["16-bit channels"] = f"{sum(outs)} / {sum(chans)}" if chans else sum(outs)
    if ratios:
        row["mean clip ratio"] = float(np.mean(ratios))
    if floor:
        row["at grid floor"] = float(np.mean(floor))
    return row


def layer_rows(run: RecipeRun) -> list[dict]:
    rows = []
    for rec in run.layers:
        rel = rec.get("rel_error") if isinstance(rec.get("rel_error"), dict) else {}
        for name, info in rec["linears"].items():
            if not isinstance(info, dict):
                continue
            st = (info.get("stats") or {}).get("all") or {}
            rows.append(
                {
                    "layer": f"{rec['stack']}.{rec['block']}.{name}",
                    "tokens": info.get("tokens"),
                    "modalities": ", ".join(info.get("modalities") or []) or "—",
                    "|x| max": max(abs(st.get("min", 0) or 0), abs(st.get("max", 0) or 0)) if st else None,
                    "max/median ch.": st.get("absmax_max_over_median"),
                    "kurtosis max": st.get("kurtosis_max"),
                    "outliers": info.get("outlier_channels"),
                    "eff. bits": info.get("effective_bits"),
                    "block rel. err (all)": rel.get("all"),
                    "module": info.get("module"),
                }
            )
    return rows


# ------------------------------------------------------------------------------------------- page


class _Page:
    def __init__(self, out_dir: Path, embed: bool):
        self.out, self.embed = out_dir, embed
        self.notes: list[str] = []

    def figure(self, fname: str, draw: Callable[[Path], Path], caption: str, alt: str) -> str:
        path = self.out / fname
        try:
            draw(path)
        except Exception as e:
            log.warning("report figure %s failed: %s", fname, e, exc_info=True)
            return note(f"The figure {fname} could not be drawn ({type(e).__name__}: {e}).", "warn")
        return self.image(path, caption, alt)

    def image(self, path: Path, caption: str, alt: str) -> str:
        if self.embed:
            src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
            if path.parent == self.out:
                path.unlink(missing_ok=True)
        else:
            src = path.name
        return (
            f'<figure><img src="{esc(src)}" alt="{esc(alt)}" loading="lazy">'
            f"<figcaption>{caption}</figcaption></figure>"
        )


def _comparison_rows(data: RunData) -> tuple[list[dict], str | None]:
    if data.summary:
        return data.summary, None
    rows = []
    for r in data.runs:
        if r.report.get("fp") and not rows and isinstance(r.report.get("fp"), dict):
            metric = (r.report.get("task") or {}).get("metric")
            if metric in r.report["fp"]:
                rows.append({"recipe": "fp32", metric: r.report["fp"][metric]})
        rows.append(r.row or {"recipe": r.name})
    return rows, (
        "No summary.json in the run directory: the table is assembled from each recipe's report.json."
    )


def _task(data: RunData) -> dict:
    for r in data.runs:
        t = r.report.get("task")
        if isinstance(t, dict) and t:
            return t
    return {}


def render_page(data: RunData, out_dir: Path, *, embed_images: bool = False, title: str | None = None) -> str:
    page = _Page(Path(out_dir), embed_images)
    runs = data.runs
    task = _task(data)
    metric = str(task.get("metric") or "")
    run_meta = next((r.run for r in runs if r.run), {})
    model = run_meta.get("model") or "—"
    title = title or f"MorphoQuant report — {data.root.resolve().name}"
    sections: list[tuple[str, str, str]] = []  # (id, heading, html)

    # ---- results
    parts = []
    rows, why = _comparison_rows(data)
    if why:
        parts.append(note(why))
    if any(len(r) > 1 for r in rows):
        first = _FIRST + ([metric] if metric else []) + _AFTER_METRIC
        parts.append(table(rows, first=first, best=[metric] if metric else []))
        d = direction(metric) if metric else None
        parts.append(
            '<p class="caption">One row per recipe (first: full precision). '
            + (
                f"Task metric <b>{esc(metric)}</b> ({d} is better; best quantized value in bold). "
                if d
                else (f"Task metric <b>{esc(metric)}</b>. " if metric else "")
            )
            + "× FP: metric relative to full precision. Eff. act. bits: MAC-weighted mean activation bits "
            "counting 16-bit outlier channels; 16-bit channels: their share of input channels.</p>"
        )
    else:
        parts.append(note("No evaluated metrics (quantize was run with --no-eval?)."))
    if data.compare:
        parts.append("<h3>Comparison (morphoquant compare)</h3>")
        cm = [k for k in (data.compare[0] if data.compare else {}) if direction(k)]
        parts.append(table(data.compare, first=_FIRST + ([metric] if metric else []), best=cm))
        parts.append(
            '<p class="caption">From compare.json; best value per column in bold where the column name '
            "says whether lower or higher is better.</p>"
        )
    parts.append("<h3>Task results</h3>")
    tr = []
    fp = next((r.report.get("fp") for r in runs if isinstance(r.report.get("fp"), dict)), None)
    if fp:
        tr.append({"recipe": "fp32", **{k: v for k, v in fp.items() if _scalar(v)}})
    for r in runs:
        m = r.row.get("metrics")
        if isinstance(m, dict):
            tr.append({"recipe": r.name, **{k: v for k, v in m.items() if _scalar(v)}})
    if task:
        desc = ", ".join(f"{esc(k)} <b>{esc(fmt(v))}</b>" for k, v in task.items() if _scalar(v))
        parts.append(f'<p class="caption">Task: {desc}.</p>')
    if len(tr) > (1 if fp else 0):
        parts.append(
            table(
                tr,
                first=["recipe"] + ([metric] if metric else []),
                best=[k for k in tr[-1] if direction(k)],
            )
        )
    else:
        parts.append(note("No task results in report.json (no evaluation was run)."))
    sections.append(("results", "Results", "".join(parts)))

    # ---- reconstruction error
    blocks = union_blocks(runs)
    errs = rel_errors(runs, blocks)
    if errs:
        html_ = page.figure(
            "rel_error.png",
            lambda p: plots.plot_rel_error(blocks, errs, p),
            "Relative squared error ‖Y<sub>q</sub> − Y<sub>fp</sub>‖² / ‖Y<sub>fp</sub>‖² of each "
            "block's output on the calibration tokens, along depth (towers first, then the "
            "decoder; solid vertical lines separate stacks). One panel per modality, one line "
            "per recipe; lower is better. Quantized outputs feed the next block, so errors "
            "accumulate with depth. A missing point means that recipe left the block in full "
            "precision or the block saw no tokens of that modality.",
            "reconstruction error per block",
        )
    else:
        html_ = note("No per-block reconstruction error in the reports.")
    sections.append(("error", "Reconstruction error along depth", html_))

    # ---- bit budget
    keys = union_keys(runs)
    bb = bit_budget(runs, keys)
    if bb and keys:
        html_ = page.figure(
            "bits.png",
            lambda p: plots.plot_bits(keys, bb, p),
            "Top: share of each linear's input channels that stay in 16 bits (the outlier channels "
            "MorphoQuant routes through its DABC residual path). Bottom: the resulting effective "
            "activation bits, 4 + 16 × that share for W4A4; recipes without outlier channels show "
            "their flat activation width. x axis: every quantized linear in execution order, "
            "labelled at the first linear of each block.",
            "16-bit share and effective bits",
        )
    else:
        html_ = note("No per-layer bit information in the reports.")
    sections.append(("bits", "16-bit channels and effective bits", html_))

    # ---- activations
    parts = []
    primary = max(runs, key=lambda r: len(r.linears()))
    others = [r for r in runs if r is not primary and r.linears()]
    if primary.linears():
        parts.append(_activation_block(page, primary, data, open_=True))
        for r in others:
            parts.append(
                f"<details><summary>Activation statistics seen by recipe <b>{esc(r.name)}</b></summary>"
                f"{_activation_block(page, r, data, open_=False)}</details>"
            )
    else:
        parts.append(note("No quantized layers in any report: nothing to show."))
    sections.append(("activations", "Activations per layer and modality", "".join(parts)))

    # ---- outliers and clipping
    parts = []
    method_runs = [r for r in runs if r.has_method_arrays]
    for r in runs:
        if r not in method_runs:
            parts.append(
                note(
                    f"Recipe {r.name} (method {r.method or 'unknown'}) has no dispersion / outlier / "
                    "clip arrays: nothing to show for it here."
                )
            )
    for r in method_runs:
        parts.append(_method_block(page, r, data))
    sections.append(("outliers", "Outlier channels and clipping", "".join(parts)))

    # ---- embeddings
    if data.embeddings:
        parts = []
        for recipe, src in data.embeddings:
            fname = f"embeddings{'-' + _slug(recipe) if recipe else ''}.png"
            dst = page.out / fname
            try:
                dst.write_bytes(src.read_bytes())
                parts.append(
                    page.image(
                        dst,
                        "Token features (hidden states) projected on the first two "
                        "principal components of the full-precision features, one panel per "
                        "modality: coloured dots are FP tokens, black crosses the same tokens "
                        "after quantization (grey: the other modalities, for context). Crosses "
                        "sitting on their dots mean the quantized model keeps the feature "
                        "geometry; the title gives the mean per-token cosine similarity."
                        + (f" Recipe {esc(recipe)}." if recipe else ""),
                        "embedding PCA",
                    )
                )
            except OSError as e:
                parts.append(note(f"{src} could not be copied: {e}", "warn"))
        html_ = "".join(parts)
    else:
        html_ = note(
            "No embeddings.png in the run directory. It needs the models: call "
            "morphoquant.report.embedding_plot(fp_hidden, q_hidden, modality_ids, "
            "'<run dir>/embeddings.png') and rebuild the report."
        )
    sections.append(("embeddings", "Token features: full precision vs quantized", html_))

    # ---- per-recipe details and notes
    parts = []
    if data.notes:
        parts.append(
            "<h3>Run directory</h3><ul class='notes'>"
            + "".join(f"<li>{esc(n)}</li>" for n in data.notes)
            + "</ul>"
        )
    for r in runs:
        q = r.quantization
        meta = {
            "method": r.method or "—",
            "stacks": ", ".join(q.get("stacks") or []) or "—",
            "passthrough": ", ".join(q.get("passthrough") or []) or "none",
            "calibration s": q.get("seconds"),
            "peak RSS MB": q.get("peak_rss_mb"),
        }
        dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(fmt(v))}</dd>" for k, v in meta.items())
        notes_html = (
            ("<ul class='notes'>" + "".join(f"<li>{esc(n)}</li>" for n in r.notes) + "</ul>")
            if r.notes
            else ""
        )
        lr = layer_rows(r)
        layer_tbl = (
            (
                f"<details><summary>Per-layer table ({len(lr)} linears)</summary>"
                f"{table(lr, first=['layer'], cls='small')}</details>"
            )
            if lr
            else ""
        )
        parts.append(f"<h3>{esc(r.name)}</h3><dl class='meta'>{dl}</dl>{notes_html}{layer_tbl}")
    sections.append(("details", "Recipes in detail", "".join(parts)))

    return _document(title, data, runs, model, task, sections)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def _activation_block(page: _Page, run: RecipeRun, data: RunData, open_: bool) -> str:
    slug = _slug(run.name)
    keys, bands, kurt, per_channel = activation_bands(run)
    parts = [
        f'<p class="lead">Calibration activations at the input of every quantized linear, as recorded by '
        f"recipe <b>{esc(run.name)}</b> (the recipe covering the most layers; each block sees the outputs "
        f"of the already quantized blocks before it).</p>"
        if open_
        else ""
    ]
    if not bands:
        parts.append(note("No activation statistics in this report."))
        return "".join(parts)
    if len([m for m in bands if m != "all"]) <= 1:
        parts.append(note(f"Only one modality ({', '.join(bands)}) in the calibration data of this run."))
    if not per_channel:
        parts.append(
            note(
                "Per-channel arrays (channels.safetensors) are missing: the band across channels "
                "cannot be drawn, only the median and largest channel from report.json."
            )
        )
    parts.append(
        page.figure(
            f"act_range-{slug}.png",
            lambda p: plots.plot_activation_range(keys, bands, p),
            "Top: for each linear (x, in execution order) the per-channel maximum |x| over the calibration "
            "tokens of one modality (one colour each, side by side), summarised over the linear's input "
            "channels: the bar spans the 10th–90th percentile of channels, the dot is the median channel "
            "and the tick the largest channel (log scale; for more than 80 linears: lines with shaded "
            "bands). A long way from dot to tick means a few outlier channels that a shared 4-bit scale has "
            "to cover. Bottom: that ratio, largest / median channel range, per modality.",
            "activation range per layer",
        )
    )
    if kurt:
        parts.append(
            page.figure(
                f"kurtosis-{slug}.png",
                lambda p: plots.plot_kurtosis(keys, kurt, p),
                "Kurtosis over tokens of each input channel (3 = Gaussian; larger = heavier tails, i.e. "
                "rare large values), per modality: median channel (solid) and the most heavy-tailed channel "
                "(dashed).",
                "kurtosis per layer",
            )
        )
    return "".join(parts)


def _method_block(page: _Page, run: RecipeRun, data: RunData) -> str:
    slug = _slug(run.name)
    parts = [f"<h3>{esc(run.name)}</h3>", table([method_summary(run)], cls="compact")]
    panels = dispersion_panels(run)
    if panels:
        parts.append(
            page.figure(
                f"dispersion-{slug}.png",
                lambda p: plots.plot_dispersion(panels, p),
                "Dispersion score D<sub>c</sub> = (max − min) / log(1 + mean|x|) of every input channel for "
                "a few representative linears (most outlier channels, most extreme channel, first and "
                "last). A channel is an outlier (red, kept in 16 bits) when its score exceeds the layer's "
                "own μ + kσ (local, dashed) or that of all quantized layers of the stack (global, dotted), "
                "up to the per-layer budget.",
                "dispersion scores",
            )
        )
    else:
        parts.append(note("No dispersion scores in channels.safetensors."))
    names, masks = outlier_masks(run)
    if masks:
        parts.append(
            page.figure(
                f"outliers-{slug}.png",
                lambda p: plots.plot_outlier_heatmap(names, masks, p),
                "Which input channels are outliers, for every quantized linear (rows, execution order) and "
                "channel (columns). Vertical streaks = the same channel is an outlier in many layers "
                "(typical of residual-stream outliers feeding q/k/v and gate/up); right axis: count / layer "
                "width.",
                "outlier heat map",
            )
        )
    else:
        parts.append(note("No outlier masks in channels.safetensors."))
    groups = clip_groups(run)
    if groups:
        parts.append(
            page.figure(
                f"clip-{slug}.png",
                lambda p: plots.plot_clip(groups, p),
                "Left: the clip ratio chosen per channel by the MDQFO search (α<sub>c</sub> / channel "
                "range; 1 = no clipping), pooled over linears and stacked by stack; outlier channels "
                "excluded. Right: the clip α against the channel's calibration range |x|max (log-log); "
                "points on the diagonal are not clipped, points below it are clipped; red crosses are "
                "outlier channels.",
                "clip alpha",
            )
        )
    else:
        parts.append(note("No clip ratios / α in channels.safetensors."))
    lt = loss_table(run)
    if lt:
        parts.append(
            "<h4>Clip search loss per modality</h4>"
            + table(lt, first=["modality"], cls="compact")
            + '<p class="caption">Mean over linears of the reconstruction loss of the quantized '
            "activations (L<sub>p</sub> + λ·cosine) before (no clipping) and after the clip search, "
            "on each modality's tokens.</p>"
        )
    return "".join(parts)


CSS = """
:root { --fg:#1f2933; --muted:#52606d; --line:#e4e7eb; --bg:#f5f7fa; --card:#ffffff; --accent:#0b5cad;
        --warn:#fff4e5; --warnline:#f0b45b; --info:#eef4fb; --infoline:#9cc1e8; }
* { box-sizing: border-box; }
html { background: var(--bg); }
body { margin: 0; color: var(--fg);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue",
       "DejaVu Sans", Arial, sans-serif; }
header { background: #102a43; color: #f0f4f8; padding: 28px 0 20px; }
header .wrap, main, footer { max-width: 1340px; margin: 0 auto; padding: 0 28px; }
header h1 { margin: 0 0 6px; font-size: 26px; font-weight: 650; letter-spacing: -0.01em; }
header p { margin: 0; color: #bcccdc; }
header dl.meta { margin-top: 14px; }
header dl.meta dt { color: #9fb3c8; }
header dl.meta dd { color: #f0f4f8; }
nav.toc { margin-top: 16px; display: flex; flex-wrap: wrap; gap: 6px 8px; }
nav.toc a { color: #d9e2ec; text-decoration: none; border: 1px solid #334e68; border-radius: 14px;
            padding: 2px 11px; font-size: 13px; }
nav.toc a:hover { background: #243b53; }
main { padding-top: 22px; padding-bottom: 30px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
          padding: 18px 24px 12px;
          margin: 0 0 22px; box-shadow: 0 1px 2px rgba(16,42,67,.05); }
h2 { margin: 0 0 10px; font-size: 20px; font-weight: 650; border-bottom: 2px solid var(--line);
     padding-bottom: 6px; }
h3 { margin: 20px 0 8px; font-size: 16.5px; font-weight: 650; }
h4 { margin: 16px 0 6px; font-size: 14.5px; }
p.lead { color: var(--muted); margin: 4px 0 10px; }
p.caption, figcaption { color: var(--muted); font-size: 13.5px; margin: 6px 2px 12px; max-width: 1150px; }
figure { margin: 10px 0 18px; }
figure img { display: block; width: 100%; max-width: 1320px; height: auto; border: 1px solid var(--line);
             border-radius: 6px; background: #fff; }
.tablewrap { overflow-x: auto; margin: 6px 0; }
table { border-collapse: collapse; font-size: 13.5px; min-width: 40%; }
th, td { padding: 5px 11px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
th { background: #f0f4f8; font-weight: 600; color: #334e68; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; font-family: ui-monospace, "DejaVu Sans Mono",
         Menlo, Consolas, monospace; font-size: 12.5px; }
td.best { font-weight: 700; color: #0b6e2e; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.ref td { color: var(--muted); font-style: italic; }
table.small td, table.small th { font-size: 12px; padding: 3px 8px; }
table.compact { min-width: 0; }
.note { border-left: 4px solid var(--infoline); background: var(--info); padding: 7px 12px; margin: 8px 0;
        border-radius: 0 6px 6px 0; font-size: 13.5px; color: #243b53; }
.note.warn { border-left-color: var(--warnline); background: var(--warn); }
ul.notes { margin: 6px 0; padding-left: 20px; color: var(--muted); font-size: 13.5px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 6px 0;
          font-size: 14px; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; }
details { margin: 10px 0; border: 1px solid var(--line); border-radius: 8px; padding: 6px 12px;
          background: #fcfcfd; }
details > summary { cursor: pointer; color: var(--accent); font-weight: 600; }
.legendkey { display: inline-flex; gap: 14px; font-size: 13px; color: var(--muted); margin: 0 0 6px; }
.legendkey span::before { content: ""; display: inline-block; width: 10px; height: 10px; border-radius: 2px;
                          margin-right: 5px; background: var(--c); vertical-align: -1px; }
footer { color: var(--muted); font-size: 12.5px; padding-bottom: 30px; }
"""


def _document(
    title: str, data: RunData, runs: list[RecipeRun], model, task: dict, sections: list[tuple[str, str, str]]
) -> str:
    try:
        from importlib.metadata import version

        ver = version("morphoquant")
    except Exception:  # noqa: BLE001
        ver = "dev"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {
        "Model": model,
        "Recipes": ", ".join(r.name for r in runs),
        "Task": (f"{task.get('task', '—')} · metric {task.get('metric', '—')}" if task else "—"),
        "Run directory": str(data.root.resolve()),
        "Generated": now,
    }
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in meta.items())
    mods = sorted(
        {m for r in runs for _, info in r.linears() for m in (info.get("modalities") or [])},
        key=lambda m: MODS.index(m) if m in MODS else 99,
    )
    key = "".join(f'<span style="--c:{plots.modality_color(m)}">{esc(m)}</span>' for m in mods)
    toc = "".join(f'<a href="#{sid}">{esc(h)}</a>' for sid, h, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{esc(h)}</h2>'
        + (f'<div class="legendkey">Modality colours: {key}</div>' if key and sid == "activations" else "")
        + f"{content}</section>"
        for sid, h, content in sections
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="morphoquant {esc(ver)}">
<title>{esc(title)}</title>
<style>{CSS}</style>
</head>
<body>
<header><div class="wrap">
<h1>{esc(title)}</h1>
<p>Post-training quantization report: what the activations look like per layer and modality, what each recipe
did about them, and what it cost in accuracy.</p>
<dl class="meta">{dl}</dl>
<nav class="toc">{toc}</nav>
</div></header>
<main>
{body}
</main>
<footer>Generated by morphoquant {esc(ver)} · self-contained page, no network resources ·
figures are PNG files next to this page (or embedded).</footer>
</body>
</html>
"""

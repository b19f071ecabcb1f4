"""Merge ``morphoquant compare`` outputs (and the peer toolkit's rows) into one method × format table.

usage: python benchmarks/merge_table.py OUT.md RUN_DIR [RUN_DIR ...] [--peer runs/peer-llmc/MODEL/peer.json]

Each RUN_DIR holds a ``compare.json``. A row's *family* is its recipe name without bit widths
(``gptq-w4a4`` → ``gptq``, ``quarot-gptq-w4a4@w8a8`` → ``quarot-gptq``, the sanity row ``gptq@w8a8`` →
``gptq``); its *format* comes from the bits actually used (``W4g64+gptq`` / ``A4-token`` → ``W4A4``). One cell per
(family, format): the metric and its ratio to FP; the W4A4 column also carries the effective activation bits.
When two runs give the same cell, the later RUN_DIR on the command line wins (and the clash is listed).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

FORMATS = ["W8A8", "W4A8", "W4A16", "W4A4"]


def family_of(recipe: str) -> str:
    """Recipe name without its bit widths: ``rtn-w4a4-static`` → ``rtn-static``."""
    base = recipe.split("@", 1)[0]
    base = re.sub(r"-w\d+a\d+", "", base)
    return base


def format_of(weights: str, activations: str) -> str | None:
    """``W4g64+gptq``, ``A4-token`` → ``W4A4``; None for the FP row."""
    mw = re.match(r"W(\d+)", weights or "")
    ma = re.match(r"A(\d+)", activations or "")
    if not mw or not ma:
        return None
    return f"W{mw.group(1)}A{ma.group(1)}"


def peer_metric_of(meta: dict) -> tuple[str, str]:
    """(table metric, row key) of a peer.json: ``("wer", "wer")`` for Whisper runs (``metric`` in its meta),
    ``("wiki_ppl", "ppl")`` for language models (their meta names no metric)."""
    metric = meta.get("metric") or "wiki_ppl"
    return metric, ("ppl" if metric == "wiki_ppl" else metric)


def collect(run_dirs: list[Path], peer: Path | None = None):
    """(metric, lower_is_better, fp value, cells {(family, format): row}, clashes, commands)."""
    cells, clashes, commands = {}, [], []
    metric, fp, lower = None, None, True
    for d in run_dirs:
        f = d / "compare.json"
        if not f.exists():
            raise SystemExit(f"merge_table: {f} not found (run `morphoquant compare ... --out {d}` first)")
        data = json.loads(f.read_text())
        commands.append(data["meta"]["command"])
        task = data["meta"].get("task") or {}
        metric = metric or task.get("metric")
        if metric is None:
            raise SystemExit(f"merge_table: {f} names no task metric")
        lower = not metric.endswith(("acc", "accuracy", "score"))   # omni_acc, vqa_acc: higher is better
        for r in data["rows"]:
            if r["recipe"] == "fp32":
                fp = r.get(metric)
                continue
            fmt = format_of(r.get("weights", ""), r.get("activations", ""))
            if fmt is None:
                continue
            key = (family_of(r["recipe"]), fmt)
            if key in cells:
                clashes.append(f"{key[0]} {key[1]}: {cells[key]['recipe']} ({d_name(cells[key])}) replaced by "
                               f"{r['recipe']} ({d.name})")
            cells[key] = {**r, "_dir": d.name}
    if peer is not None:
        data = json.loads(peer.read_text())
        peer_metric, row_key = peer_metric_of(data["meta"])
        if metric not in (None, peer_metric):
            what = {"wiki_ppl": "wiki perplexities", "wer": "word error rates"}.get(peer_metric, peer_metric)
            raise SystemExit(f"merge_table: peer rows are {what} ({peer_metric}, {peer}), the runs measure "
                             f"{metric}; merge the peer.json of the same model and task")
        metric = metric or peer_metric
        commands.append(data["meta"]["command"] + "  # peer toolkit rows, several commands: see peer.md")
        for r in data["rows"]:
            if r.get("scheme") == "fp32" or r.get(row_key) is None:
                continue
            w = re.match(r"W(\d+)", r["weights"]).group(1)
            a = re.match(r"A(\d+)", r["activations"]).group(1)
            method = r["scheme"].split("-", 1)[1]
            key = (f"llm-compressor {method}", f"W{w}A{a}")
            cells[key] = {"recipe": r["recipe"], metric: r[row_key], "calib_seconds": r.get("calib_seconds"),
                          "_dir": peer.parent.name}
    return metric, lower, fp, cells, clashes, commands


def d_name(row):
    return row.get("_dir", "?")


def render(metric, lower, fp, cells, clashes, commands, title: str) -> str:
    fams = []
    for fam, _ in cells:
        if fam not in fams:
            fams.append(fam)

    def cell(fam, fmt):
        r = cells.get((fam, fmt))
        if r is not None and r.get("error"):
            return "n/a (" + r["error"].split(":", 1)[0] + ")"
        if r is None or r.get(metric) is None:
            return "–"
        v = float(r[metric])
        txt = f"{v:.4g}"
        if fp:
            ratio = v / fp if lower else fp / max(v, 1e-12)
            txt += f" ({ratio:.2f}×)"
        if fmt == "W4A4" and r.get("effective_act_bits") not in (None, "") and float(r["effective_act_bits"]) > 4.001:
            txt += f", {float(r['effective_act_bits']):.2f} b"
        if r.get("sanity") == "FAIL":
            txt += " **sanity FAIL**"
        return txt

    lines = [f"# {title}", "", f"{metric} (ratio to FP; at W4A4, effective activation bits when above 4). "
             f"FP = {fp:.4g}." if fp is not None else f"{metric}.", "",
             "| method | " + " | ".join(FORMATS) + " |", "|---|" + "---|" * len(FORMATS)]
    for fam in fams:
        lines.append(f"| {fam} | " + " | ".join(cell(fam, f) for f in FORMATS) + " |")
    lines += ["", "Commands:", ""] + [f"    {c}" for c in commands]
    if clashes:
        lines += ["", "Cells given by two runs (the later kept):", ""] + [f"- {c}" for c in clashes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="Markdown file to write")
    p.add_argument("runs", nargs="+", type=Path, help="compare --out directories")
    p.add_argument("--peer", type=Path, default=None, help="peer.json of scripts/peer_llmcompressor.py")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    metric, lower, fp, cells, clashes, commands = collect(a.runs, a.peer)
    title = a.title or f"Methods × formats ({', '.join(d.name for d in a.runs)})"
    text = render(metric, lower, fp, cells, clashes, commands, title)
    tmp = Path(a.out).with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(a.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

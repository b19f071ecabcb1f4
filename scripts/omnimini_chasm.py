"""The "modality chasm" on a real model: per-modality statistics of the inputs of OmniMini's decoder linears.

    OMP_NUM_THREADS=1 python scripts/omnimini_chasm.py --calib 32 --out docs/img

Runs the full-precision OmniMini over the OmniMini calibration mix (image QA, spoken QA, transcription, text
windows; ``OmniMiniTask.calibration_samples``), collects per-modality :class:`ChannelStats` of the input of every
decoder linear (``ActivationCollector`` with the adapter's per-token modality ids), and prints / writes JSON:

* range: the largest |x| per modality (what a per-tensor activation scale must cover), and its ratio to text;
* kurtosis: median and max over channels of the per-channel kurtosis, per modality;
* outlier channels per modality: channels whose max |x| exceeds ``--ratio`` (10) x the layer's median channel
  max |x| for that modality, and the channels that are outliers for audio (image) but not for text; the count
  flagged by the paper's dispersion test (Eq. 5-6, local ``mu + 2 sigma``) is in the JSON as well (it flags a
  near-constant few percent of the channels of every layer, so it says little about modality differences);
* two plots: per-layer largest |x| per modality for the attention (q/k/v) and MLP-down inputs, and the
  per-channel |x| maxima of the layer with the largest audio/text range ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=32, help="calibration samples (cycling the four kinds)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per text window")
    ap.add_argument("--out", default="docs/img", help="directory for the PNG plots")
    ap.add_argument("--json", default=None, help="write the per-layer numbers here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=10.0,
                    help="outlier channel: its max |x| exceeds RATIO x the median channel's (per modality)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from morphoquant.eval.omnimini import OmniMiniTask
    from morphoquant.models import get_adapter
    from morphoquant.statistics import ActivationCollector
    from morphoquant.statistics.dispersion import Threshold, dispersion_score, outlier_mask
    from morphoquant.zoo import load_model

    t0 = time.time()
    model, proc = load_model("omnimini")
    adapter = get_adapter(model)
    task = OmniMiniTask(proc)
    samples = task.calibration_samples(args.calib, args.seq_len, 0)
    text_stack = adapter.stack("text")
    linears = {f"{i}.{n}": m for i, b in enumerate(text_stack.blocks) for n, m in text_stack.linears(b).items()}
    with ActivationCollector(linears) as col, torch.no_grad():
        for s in samples:
            col.current_ids = adapter.decoder_modality_ids(s)
            col.new_forward()
            model(**s)
    stats = {n: st for n, st in col.stats.items() if n not in col.alias}
    tokens = {m: stats["0.self_attn.q_proj"][m].count for m in stats["0.self_attn.q_proj"].modalities}
    print(f"{len(samples)} samples, tokens per modality {tokens}, {time.time() - t0:.0f} s")

    rows = []
    for name, st in stats.items():
        row = {"layer": name}
        masks = {}
        for m in st.modalities:
            c = st[m]
            absmax = c.absmax
            kurt = c.kurtosis
            score = dispersion_score(c)
            dmask = outlier_mask(score, Threshold.of(score, 2.0), None)
            masks[m] = absmax > args.ratio * absmax.median()
            row[m] = {"absmax": float(absmax.max()), "absmax_over_median": float(absmax.max() / absmax.median()),
                      "rms": float(c.rms.mean()), "kurtosis_median": float(kurt.median()),
                      "kurtosis_max": float(kurt.max()), "outliers": int(masks[m].sum()),
                      "outliers_dispersion": int(dmask.sum()), "top_channels": absmax.topk(3).indices.tolist(),
                      "outlier_channels": masks[m].nonzero().flatten().tolist()}
        for m in ("audio", "image"):
            if m in masks and "text" in masks:
                only = (masks[m] & ~masks["text"]).nonzero().flatten().tolist()
                row[f"{m}_not_text"] = only
                row[f"{m}_over_text_absmax"] = row[m]["absmax"] / row["text"]["absmax"]
        rows.append(row)

    def show(kind: str):
        print(f"\n{kind}: layer | absmax text / image / audio | kurtosis max text / image / audio | outlier "
              "channels text / image / audio | audio-not-text | image-not-text")
        for r in rows:
            if not r["layer"].endswith(kind):
                continue
            mods = ("text", "image", "audio")
            print(f"{r['layer']:<22} " + " / ".join(f"{r[m]['absmax']:7.1f}" for m in mods) + " | " +
                  " / ".join(f"{r[m]['kurtosis_max']:7.0f}" for m in mods) + " | " +
                  " / ".join(f"{r[m]['outliers']:3d}" for m in mods) +
                  f" | {len(r['audio_not_text']):3d} | {len(r['image_not_text']):3d}")

    for kind in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        show(kind)
    summary = {}
    for m in ("image", "audio"):
        ratios = [r[f"{m}_over_text_absmax"] for r in rows]
        summary[m] = {"absmax_ratio_to_text_median": float(torch.tensor(ratios).median()),
                      "absmax_ratio_to_text_max": max(ratios),
                      "layers_with_outliers_not_in_text": sum(bool(r[f"{m}_not_text"]) for r in rows),
                      "outlier_channels_not_in_text_total": sum(len(r[f"{m}_not_text"]) for r in rows)}
    print("\nsummary:", json.dumps(summary, indent=1))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = {"text": "#4c72b0", "image": "#55a868", "audio": "#c44e52"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, kind in zip(axes, ("self_attn.q_proj", "mlp.down_proj")):
        sel = [r for r in rows if r["layer"].endswith(kind)]
        for m in ("text", "image", "audio"):
            ax.semilogy([int(r["layer"].split(".")[0]) for r in sel], [r[m]["absmax"] for r in sel], "o-",
                        ms=3, color=colours[m], label=m)
        ax.set_title(f"input of {kind} (max |x| per modality)")
        ax.set_xlabel("decoder layer")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "omnimini_chasm_range.png", dpi=110)
    worst = max(rows, key=lambda r: r["audio_over_text_absmax"])
    fig, ax = plt.subplots(figsize=(11, 3.4))
    for m in ("text", "image", "audio"):
        ax.plot(stats[worst["layer"]][m].absmax.numpy(), lw=0.8, color=colours[m], label=m, alpha=0.85)
    ax.set_yscale("log")
    ax.set_xlabel("input channel")
    ax.set_title(f"per-channel max |x|, layer {worst['layer']} (largest audio/text range ratio "
                 f"{worst['audio_over_text_absmax']:.1f}x)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "omnimini_chasm_channels.png", dpi=110)
    plt.close("all")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": tokens, "summary": summary, "layers": rows}, indent=1))
    print(f"plots in {out}; {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

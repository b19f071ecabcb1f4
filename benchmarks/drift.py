"""How the quantization error grows through a decoder: per-block drift from the FP model on held-out windows.

For every recipe, quantize a copy of MODEL on the table's calibration windows (seed 0), run the FP and the quantized
model on held-out windows (seed 1, the same split, other text) and report after block ℓ

    drift_ℓ = mean over tokens n of ‖ĥ_ℓ,n − h_ℓ,n‖ / ‖h_ℓ,n‖

on the residual stream (a rotated model's stream is mapped back with ``Qᵀ``: exact, Q is orthogonal), and the
mean per-token ``KL(P_FP ‖ P_Q)`` of the next-token distributions. The pipeline's per-block error (layers.jsonl)
is what each block adds given its already-quantized inputs; drift is what the model carries — those additions
plus how the earlier errors grow or cancel downstream. Two recipes with the same per-block errors can drift apart.

usage: python benchmarks/drift.py MODEL RECIPE [RECIPE ...] [--calib 16] [--seq-len 512] [--windows 4] [--eval-windows 8]
                                  [--resume DIR] [--json FILE] [--threads 1]
       RECIPE is a built-in name or a YAML path; --resume DIR keeps a per-block checkpoint per recipe (DIR/NAME),
       so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from morphoquant.api import load_recipe, quantize
from morphoquant.eval.tasks import TextLMTask
from morphoquant.methods.quarot import unrotate_residual_stream
from morphoquant.models import get_adapter
from morphoquant.zoo import load_model


def block_outputs(model, samples) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Per sample: every decoder block's output (residual stream, original basis) and the logits."""
    stack = next((s for s in get_adapter(model).stacks() if s.name == "text"), None)
    if stack is None:
        raise SystemExit(f"drift.py measures decoder-only language models; {type(model).__name__} has no text stack")
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
             for b in stack.blocks]
    states, logits = [], []
    try:
        with torch.no_grad():
            for smp in samples:
                seen.clear()
                out = model(**smp, use_cache=False)
                # one inverse rotation for all blocks of the sample (it rebuilds the Hadamard factor per call)
                states.append(list(unrotate_residual_stream(model, torch.stack(seen).float())))
                logits.append(out.logits.float())
    finally:
        for h in hooks:
            h.remove()
    return states, logits


def drift(fp, q) -> dict:
    (hf, lf), (hq, lq) = fp, q
    per_block = []
    for b in range(len(hf[0])):
        num = den = 0.0
        for s in range(len(hf)):
            x, y = hf[s][b].reshape(-1, hf[s][b].shape[-1]), hq[s][b].reshape(-1, hq[s][b].shape[-1])
            num += float(((y - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-30)).sum())
            den += x.shape[0]
        per_block.append(num / den)
    kl = num_tokens = 0.0
    for a, b in zip(lf, lq):
        lp, lq_ = F.log_softmax(a.reshape(-1, a.shape[-1]), -1), F.log_softmax(b.reshape(-1, b.shape[-1]), -1)
        kl += float((lp.exp() * (lp - lq_)).sum())
        num_tokens += lp.shape[0]
    return {"drift": per_block, "kl": kl / num_tokens}


def window_nll(model, windows: torch.Tensor) -> list[float]:
    """Each evaluation window's mean next-token NLL (nats), as the table's perplexity computes it."""
    from morphoquant.eval.perplexity import evaluate_perplexity
    return [float(v) for v in evaluate_perplexity(model, windows, batch_size=4, progress=False).nll_per_window]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4, help="held-out windows")
    ap.add_argument("--resume", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-windows", type=int, default=0,
                    help="also score the table's first N evaluation windows, window by window (NLL per window)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    model.eval()
    task = TextLMTask(tok)
    calib = task.calibration_samples(a.calib, a.seq_len, seed=0)
    held_out = task.calibration_samples(a.windows, a.seq_len, seed=1)
    fp = block_outputs(model, held_out)
    results = {}
    eval_w = None
    if a.eval_windows:
        from morphoquant.data import evaluation_windows
        eval_w = evaluation_windows(tok, a.seq_len, a.eval_windows)
        results["fp"] = {"nll_per_window": window_nll(model, eval_w)}
        print("fp: NLL per evaluation window " + " ".join(f"{v:.3f}" for v in results["fp"]["nll_per_window"]),
              flush=True)
    for name in a.recipes:
        recipe = load_recipe(name)
        qmodel = copy.deepcopy(model)
        t0 = time.time()
        quantize(qmodel, recipe, calib, progress=False,
                 resume_dir=a.resume / recipe.name if a.resume else None)
        results[recipe.name] = {**drift(fp, block_outputs(qmodel, held_out)), "calib_seconds": time.time() - t0}
        r = results[recipe.name]
        print(f"{recipe.name}: KL {r['kl']:.4f}  drift " + " ".join(f"{d:.3f}" for d in r["drift"]), flush=True)
        if eval_w is not None:
            r["nll_per_window"] = window_nll(qmodel, eval_w)
            print(f"{recipe.name}: NLL per evaluation window " + " ".join(f"{v:.3f}" for v in r["nll_per_window"]),
                  flush=True)
        del qmodel
    if a.json:
        a.json.write_text(json.dumps({"model": a.model, "calib": a.calib, "seq_len": a.seq_len,
                                      "windows": a.windows, "eval_windows": a.eval_windows, "results": results},
                                     indent=1))


if __name__ == "__main__":
    main()

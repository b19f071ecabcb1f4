"""Which tokens of one evaluation window a static-range recipe breaks, and which layers saturate there.

For every evaluation window: the FP and quantized NLL and, over every linear with static per-input-channel
activation scales, the share of input elements whose code ``round(x/s) + z`` falls outside ``[q_min, q_max]``
(saturated: clipped to the edge of the calibrated range; DABC outlier channels excluded, their residual takes
the 16-bit path). For window WINDOW also the 15 tokens whose NLL grew most, with their context and the most
saturated layer at that token, and the window's most saturated layers.

usage: python benchmarks/window_probe.py MODEL RECIPE RESUME_DIR WINDOW [--eval-windows 8] [--calib 16]
       RESUME_DIR/NAME is the recipe's per-block checkpoint (e.g. the one benchmarks/drift.py --resume keeps):
       a finished one is loaded without calibrating again; otherwise the recipe is quantized (and checkpointed).
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from morphoquant.api import load_recipe, quantize
from morphoquant.data import evaluation_windows
from morphoquant.eval.tasks import TextLMTask
from morphoquant.layers import QuantLinear
from morphoquant.numerics.hadamard import hadamard_transform
from morphoquant.zoo import load_model


def saturated_share(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """Per row of ``x[N, C]`` (the layer's input), the share of elements the static per-channel quantizer
    clips: ``round(x/s) + z ∉ [q_min, q_max]``, DABC outlier channels excluded."""
    x = x.reshape(-1, x.shape[-1]).float()
    if callable(getattr(q, "hadamard", None)):
        x = hadamard_transform(x, q.hadamard())
    if q.permuted:
        x = x[:, q.input_perm]
    u = torch.round(x / q.act_scale) + q.act_zero
    out = (u < q.act.spec.qmin) | (u > q.act.spec.qmax)
    if q.outlier_idx.numel():
        out[:, q.outlier_idx] = False
    return out.float().mean(1)


def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of every position of one window ``ids[T]`` → ``[T − 1]``."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits.float()[0]
    return F.cross_entropy(logits[:-1], ids[1:], reduction="none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("recipe")
    ap.add_argument("resume", type=Path)
    ap.add_argument("window", type=int)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    model.eval()
    task = TextLMTask(tok)
    windows = evaluation_windows(tok, 512, a.eval_windows)
    recipe = load_recipe(a.recipe)
    q = copy.deepcopy(model)
    quantize(q, recipe, task.calibration_samples(a.calib, 512, seed=0), progress=False,
             resume_dir=a.resume / recipe.name)
    stats: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: stats.__setitem__(n, saturated_share(mod, args[0])))
             for n, m in q.named_modules() if isinstance(m, QuantLinear) and m.act is not None and m.act.folded]
    if not hooks:
        raise SystemExit(f"{recipe.name} has no static per-channel activation quantizers: nothing saturates")
    for win in range(a.eval_windows):
        ids = windows[win]
        nf, nq = token_nll(model, ids), token_nll(q, ids)
        sat = torch.stack(list(stats.values()))                      # [layers, T]
        print(f"window {win}: NLL fp {nf.mean():.3f} q {nq.mean():.3f}  saturated share: mean {sat.mean():.5f}, "
              f"largest (layer, token) {sat.max():.3f}", flush=True)
        if win != a.window:
            continue
        d = nq - nf
        for t in torch.topk(d, min(15, d.numel())).indices.sort().values.tolist():
            ctx = tok.decode(ids[max(0, t - 6):t + 1]).replace("\n", "\\n")
            nxt = tok.decode(ids[t + 1:t + 2]).replace("\n", "\\n")
            worst = max(stats, key=lambda n: float(stats[n][t]))
            print(f"  pos {t:3d} dNLL {float(d[t]):6.2f}  ...{ctx!r} -> {nxt!r}   saturated: mean "
                  f"{float(sat[:, t].mean()):.4f}, worst {worst} {float(stats[worst][t]):.3f}")
        top = sorted(((float(v.mean()), n) for n, v in stats.items()), reverse=True)[:8]
        print("  most saturated layers in this window:", ", ".join(f"{n} {s:.4f}" for s, n in top))
        big = d > 2
        print(f"  tokens with dNLL > 2: {int(big.sum())} of {d.numel()}; their share of the window's extra NLL: "
              f"{float(d[big].sum() / d.sum()):.2f}")
    for h in hooks:
        h.remove()


if __name__ == "__main__":
    main()

"""What a QuaRot rotation does to int4 errors, layer by layer, on real calibration inputs (no full-model run).

``weights`` — why round-to-nearest weights lose more after a rotation than without it (W4A16 rows of
docs/table.md). For every decoder ``Linear``, the output-weighted error of int4 group-64 RTN weights,
``‖X (W − Q(W))ᵀ‖_F / ‖X Wᵀ‖_F``, in three bases of the same FP function:

* ``plain``   — the model as released: X = x̂ ⊙ γ (normed hidden state times the norm weight), W;
* ``folded``  — γ folded into the readers, not rotated: X = x̂, W diag(γ) (readers of a norm only);
* ``rotated`` — QuaRot's model (γ folded, residual-stream Hadamard, online Hadamard before down_proj).

* ``act-folded`` — MorphoQuant's deployable form: the static per-input-channel activation scale s (asymmetric int4,
  ranges = min/max of the same windows, no clip) folded into the weight, X / s and W diag(s);
* ``act-folded sorted`` — the same, input channels permuted by s before the weight groups are formed (a
  permutation of the reduction dimension, applied to both operands, leaves the GEMM exact).

A rise from ``plain`` to ``folded`` is the cost of folding the norm weight, from ``folded`` to ``rotated`` the cost
of the rotation itself; from ``plain`` to ``act-folded`` the cost of folding a static activation scale.

``activations`` — which int4 activation format suits which input, with and without the rotation. For every
decoder ``Linear``, ``‖(Q(X) − X) Wᵀ‖_F / ‖X Wᵀ‖_F`` on held-out windows (seed 1) for static per-input-channel
asymmetric int4 (ranges = min/max of the calibration windows, seed 0; the ``rtn-w4a4-static`` format, no clip) and
dynamic per-token symmetric int4 (``rtn-w4a4``), in the plain and the rotated model. A down_proj input in the
rotated model is exactly the plain one times the online Hadamard, so its rows show what an online Hadamard alone
does there. A second table weighs every token equally: the mean over held-out tokens t of
``‖(Q(X) − X)_t Wᵀ‖ / ‖X_t Wᵀ‖``. The Frobenius ratio is dominated by the few massive-activation tokens (norms
hundreds of times the median); perplexity counts every token once.

Each prints the mean over blocks per projection kind.

usage: python benchmarks/diagnose_rotation.py {weights,activations} [MODEL] [--windows 4] [--seq-len 512]
"""
from __future__ import annotations

import argparse
import copy
from collections import defaultdict

import torch
from torch import nn

from morphoquant.eval.tasks import TextLMTask
from morphoquant.methods.quarot import rotate_model
from morphoquant.models import get_adapter
from morphoquant.numerics.quantizers import QuantSpec, fake_quantize, range_qparams
from morphoquant.zoo import load_model

NORM_OF = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
           "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}


def linear_inputs(model: nn.Module, samples: list[dict]) -> dict[str, torch.Tensor]:
    """Input rows of every decoder Linear (lm_head excluded), over all calibration samples."""
    xs: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: xs[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    with torch.no_grad():
        for s in samples:
            model(**s)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}


def rel_error(x: torch.Tensor, w: torch.Tensor, spec: QuantSpec) -> float:
    return ((x @ (w - fake_quantize(w, spec, "weight")).T).norm() / (x @ w.T).norm()).item()


def weight_errors(model, rotated, samples) -> dict[str, dict[str, list[float]]]:
    x_plain, x_rot = linear_inputs(model, samples), linear_inputs(rotated, samples)
    spec = QuantSpec(bits=4, symmetric=True, granularity="group", group_size=64)
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, x in x_plain.items():
        kind = name.rsplit(".", 1)[-1]
        w = model.get_submodule(name).weight.float()
        sums[kind]["plain"].append(rel_error(x, w, spec))
        if kind in NORM_OF:
            block = model.get_submodule(name.rsplit(".", 2)[0])
            g = getattr(block, NORM_OF[kind]).weight.float()
            # x̂ = x / γ; where γ = 0 the folded column of W is 0 too, so that input column does not matter
            x_hat = torch.where(g == 0, torch.zeros_like(x), x / torch.where(g == 0, torch.ones_like(g), g))
            sums[kind]["folded"].append(rel_error(x_hat, w * g, spec))
        sums[kind]["rotated"].append(rel_error(x_rot[name], rotated.get_submodule(name).weight.float(), spec))
        a_scale, _ = range_qparams(x.amin(0), x.amax(0), QuantSpec(bits=4, symmetric=False, granularity="channel"))
        a_scale = a_scale.reshape(-1)
        sums[kind]["act-folded"].append(rel_error(x / a_scale, w * a_scale, spec))
        order = torch.argsort(a_scale)        # input channels of similar scale share a weight group
        sums[kind]["act-folded sorted"].append(rel_error((x / a_scale)[:, order], (w * a_scale)[:, order], spec))
    return sums


def activation_errors(model, rotated, calib, held_out) -> dict[str, dict[str, list[float]]]:
    static = QuantSpec(bits=4, symmetric=False, granularity="channel")
    token = QuantSpec(bits=4, symmetric=True, granularity="token")
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for tag, m in (("plain", model), ("rotated", rotated)):
        xc, xe = linear_inputs(m, calib), linear_inputs(m, held_out)
        for name, x in xe.items():
            w = m.get_submodule(name).weight.float()
            y = (x @ w.T).norm()
            s, z = range_qparams(xc[name].amin(0), xc[name].amax(0), static)
            yt = (x @ w.T).norm(dim=1).clamp_min(1e-12)
            err = {"static": (fake_quantize(x, static, "activation", scale=s, zero_point=z) - x) @ w.T,
                   "token": (fake_quantize(x, token, "activation") - x) @ w.T}
            kind = name.rsplit(".", 1)[-1]
            for fmt, e in err.items():
                sums[kind][f"{tag} {fmt}"].append((e.norm() / y).item())
                sums[kind][f"{tag} {fmt}/tok"].append((e.norm(dim=1) / yt).mean().item())
    return sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["weights", "activations"])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    a = ap.parse_args()
    model, tok = load_model(a.model)
    model.eval()
    rotated = copy.deepcopy(model)
    print(rotate_model(rotated, get_adapter(rotated).stacks()))
    task = TextLMTask(tok)
    calib = task.calibration_samples(a.windows, a.seq_len, seed=0)
    if a.what == "weights":
        sums, cols = weight_errors(model, rotated, calib), ["plain", "folded", "rotated", "act-folded",
                                                           "act-folded sorted"]
    else:
        held_out = task.calibration_samples(a.windows, a.seq_len, seed=1)
        sums = activation_errors(model, rotated, calib, held_out)
        cols = ["plain static", "plain token", "rotated static", "rotated token"]
    tables = [("", cols)]
    if a.what == "activations":
        tables.append(("per-token mean, ", [f"{c}/tok" for c in cols]))
    for title, cs in tables:
        print(f"{'linear':10s} " + " ".join(f"{c.removesuffix('/tok'):>17s}" for c in cs)
              + f"   ({title}mean over blocks)")
        for kind, d in sums.items():
            mean = {k: sum(v) / len(v) for k, v in d.items()}
            print(f"{kind:10s} " + " ".join(f"{mean[c]:17.4f}" if c in mean else f"{'—':>17s}" for c in cs))


if __name__ == "__main__":
    main()

"""Why round-to-nearest weights lose more after a QuaRot rotation than without it (W4A16 rows of docs/table.md).

For every decoder ``Linear`` it measures the output-weighted weight error of int4 group-64 RTN,
``‖X (W − Q(W))ᵀ‖_F / ‖X Wᵀ‖_F`` on real calibration inputs X, in three bases of the same FP function:

* ``plain``   — the model as released: X = x̂ ⊙ γ (normed hidden state times the norm weight), W;
* ``folded``  — γ folded into the readers, not rotated: X = x̂, W diag(γ) (readers of a norm only);
* ``rotated`` — QuaRot's model (γ folded, residual-stream Hadamard, online Hadamard before down_proj).

It prints the mean per projection kind. A rise from ``plain`` to ``folded`` is the cost of folding the norm
weight, a rise from ``folded`` to ``rotated`` the cost of the rotation itself.

usage: python benchmarks/diagnose_rotated_rtn.py [MODEL] [--windows 4] [--seq-len 512]
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
from morphoquant.numerics.quantizers import QuantSpec, fake_quantize
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    a = ap.parse_args()
    model, tok = load_model(a.model)
    model.eval()
    rotated = copy.deepcopy(model)
    print(rotate_model(rotated, get_adapter(rotated).stacks()))
    samples = TextLMTask(tok).calibration_samples(a.windows, a.seq_len, seed=0)
    x_plain, x_rot = linear_inputs(model, samples), linear_inputs(rotated, samples)
    spec = QuantSpec(bits=4, symmetric=True, granularity="group", group_size=64)
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, x in x_plain.items():
        kind = name.rsplit(".", 1)[-1]
        w = model.get_submodule(name).weight.float()
        sums[kind]["plain"].append(rel_error(x, w, spec))
        sums[kind]["rotated"].append(rel_error(x_rot[name], rotated.get_submodule(name).weight.float(), spec))
        if kind in NORM_OF:
            block = model.get_submodule(name.rsplit(".", 2)[0])
            g = getattr(block, NORM_OF[kind]).weight.float()
            # x̂ = x / γ; where γ = 0 the folded column of W is 0 too, so that input column does not matter
            x_hat = torch.where(g == 0, torch.zeros_like(x), x / torch.where(g == 0, torch.ones_like(g), g))
            sums[kind]["folded"].append(rel_error(x_hat, w * g, spec))
    print(f"{'linear':10s} {'plain':>8s} {'folded':>8s} {'rotated':>8s}   (mean over blocks, int4 g64 RTN)")
    for kind, d in sums.items():
        mean = {k: sum(v) / len(v) for k, v in d.items()}
        folded = f"{mean['folded']:8.4f}" if "folded" in mean else f"{'—':>8s}"
        print(f"{kind:10s} {mean['plain']:8.4f} {folded} {mean['rotated']:8.4f}")


if __name__ == "__main__":
    main()

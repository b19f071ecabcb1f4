"""Quantize ONE decoder block of a real model with several recipes and print its reconstruction error.

The block's inputs are the full-precision hidden states entering it (calibration windows of the text-lm task),
so variants are compared on exactly the same data in seconds rather than a full-model run. The error is the
pipeline's mean per-token relative error ``mean_n ‖ŷ_n − y_n‖ / ‖y_n‖`` of the block output.

``--held-out N`` also measures that error, with the same function, on N held-out windows (seed 1) and again on the
calibration windows: a static activation range or clip fitted to the calibration tokens shows as a gap between the
two, a dynamic per-token format does not; the windows' first tokens (massive activations) are also reported
alone. Not for recipes that rotate the residual stream (QuaRot, MQuant-style): the probe rotates the probed block
only, so its inputs are not those of the rotated model; such rows are marked as not comparable.

usage: python benchmarks/probe_block.py MODEL BLOCK "RECIPE[,key=value...];RECIPE..." [--windows 8] [--held-out N]
e.g.   python benchmarks/probe_block.py smollm2-135m 5 "rtn-w4a4-static;morpho;morpho,options.lambda_cos=0"
"""
from __future__ import annotations

import argparse
import copy
import json

import torch
from torch import nn

from morphoquant.eval.tasks import TextLMTask
from morphoquant.models import get_adapter
from morphoquant.pipeline.recipe import load_recipe
from morphoquant.pipeline.runner import LayerwiseRunner
from morphoquant.zoo import load_model


def parse_variant(v: str) -> tuple[str, dict]:
    name, *sets = v.split(",")
    over: dict = {}
    for kv in sets:
        key, val = kv.split("=", 1)
        d = over
        *path, last = key.split(".")
        for k in path:
            d = d.setdefault(k, {})
        try:
            d[last] = json.loads(val)
        except json.JSONDecodeError:
            d[last] = val
    return name, over


def block_inputs(model, block: nn.Module, samples) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) ``block`` receives in ``model``'s forward, one per sample."""
    seen: list[tuple[tuple, dict]] = []
    h = block.register_forward_pre_hook(lambda _m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        for smp in samples:
            model(**smp, use_cache=False)    # a cache would keep this forward's keys for the next calls
    h.remove()
    return seen


def token_error(fp_block: nn.Module, q_block: nn.Module, inputs) -> tuple[float, float]:
    """(mean over tokens, mean over the windows' first tokens) of ``‖ŷ_n − y_n‖ / ‖y_n‖`` for the block outputs
    on the same inputs. The first token of a window carries the massive activations (the attention sink)."""
    errs = []
    with torch.no_grad():
        for args, kwargs in inputs:
            yf, yq = fp_block(*args, **kwargs), q_block(*args, **kwargs)
            yf, yq = (y[0] if isinstance(y, tuple) else y for y in (yf, yq))
            errs.append((yq - yf).float().norm(dim=-1) / yf.float().norm(dim=-1).clamp_min(1e-30))   # [B, T]
    e = torch.cat([x.reshape(-1, x.shape[-1]) for x in errs])
    return float(e.mean()), float(e[:, 0].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("block", type=int)
    ap.add_argument("variants")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--held-out", type=int, default=0, help="also measure on N held-out windows (seed 1)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    model.model.layers = model.model.layers[:a.block + 1]      # nothing after the probed block is needed
    task = TextLMTask(tok, 4, 512)
    samples = task.calibration_samples(a.windows, 512)
    if a.held_out:
        held_out = task.calibration_samples(a.held_out, 512, seed=1)
        fp_block = model.model.layers[a.block]
        inputs = {"calibration": block_inputs(model, fp_block, samples), "held-out": block_inputs(model, fp_block, held_out)}
    for v in a.variants.split(";"):
        name, over = parse_variant(v)
        m = copy.deepcopy(model)
        stacks = get_adapter(m).stacks()
        stacks[0].blocks = [m.model.layers[a.block]]            # capture stops at this block's input
        with torch.no_grad():
            rec = LayerwiseRunner(m, stacks, load_recipe(name, over), samples, progress=False).run().records[0]
        line = f"{v}: block {a.block} error {rec.rel_error['all']:.4f}  ({rec.seconds:.0f} s)"
        if getattr(m, "morphoquant_rotation", None) is not None:
            # the rotation pass sees only this block's stack: earlier blocks stay unrotated, so its inputs are not
            # the ones the fully rotated model gives it
            line += "  (not comparable: the recipe rotates the residual stream, the probe cannot)"
        elif a.held_out:
            q_block = m.model.layers[a.block]
            for k, x in inputs.items():
                mean, first = token_error(fp_block, q_block, x)
                line += f"  {k} {mean:.4f} (first token {first:.4f})"
        print(line, flush=True)


if __name__ == "__main__":
    main()

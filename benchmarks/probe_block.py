"""Quantize ONE decoder block of a real model with several recipes and print its reconstruction error.

The block's inputs are the full-precision hidden states entering it (calibration windows of the text-lm task),
so variants are compared on exactly the same data in seconds rather than a full-model run. The error is the
pipeline's mean per-token relative error ``mean_n ‖ŷ_n − y_n‖ / ‖y_n‖`` of the block output.

usage: python benchmarks/probe_block.py MODEL BLOCK "RECIPE[,key=value...];RECIPE..." [--windows 8]
e.g.   python benchmarks/probe_block.py smollm2-135m 5 "rtn-w4a4-static;morpho;morpho,options.lambda_cos=0"
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("block", type=int)
    ap.add_argument("variants")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    model.model.layers = model.model.layers[:a.block + 1]      # nothing after the probed block is needed
    samples = TextLMTask(tok, 4, 512).calibration_samples(a.windows, 512)
    for v in a.variants.split(";"):
        name, over = parse_variant(v)
        m = copy.deepcopy(model)
        stacks = get_adapter(m).stacks()
        stacks[0].blocks = [m.model.layers[a.block]]            # capture stops at this block's input
        with torch.no_grad():
            rec = LayerwiseRunner(m, stacks, load_recipe(name, over), samples, progress=False).run().records[0]
        print(f"{v}: block {a.block} error {rec.rel_error['all']:.4f}  ({rec.seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""One linear layer, K = N = 4096: fp32 ``nn.Linear`` vs the MorphoQuant integer runtime.

Variants (all bit-exact with the fake-quant path; see tests/runtime):

* ``fp32``              ``torch.nn.functional.linear``
* ``W4A4 dabc 0/2/5%``  int4 per-channel weights, int4 dynamic per-token symmetric activations, dense DABC over
                        0 / 2 / 5 % outlier channels (oneDNN int8 kernel unless ``--kernel``)
* ``W4A4 g128``         the same with group-128 weights (the compressed-tensors ``W4A4`` preset): one GEMM per group
* ``W8A8 int_mm``       int8 per-channel weights × int8 per-token activations through ``torch._int_mm``
* ``W8A8 onednn``       the same through oneDNN (8×8 bits is split into two 4-bit activation halves to stay exact)

Prints the best (and median) milliseconds of ``--repeat`` interleaved rounds and speed-ups over fp32; ``--profile`` adds the time split of one call
(activation quantization / GEMM + epilogue / DABC side product). ``torch._int_mm`` runs a naive loop on CPUs
without VNNI, so it is only timed up to ``--int-mm-max-m`` rows.

    python scripts/bench_linear.py                      # full table
    python scripts/bench_linear.py --m 1 128 --repeat 3 --profile
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from morphoquant.layers import ActivationConfig, QuantLinear
from morphoquant.numerics import QuantSpec
from morphoquant.runtime import IntegerLinear, available_kernels


def timeit(fn, repeat: int, min_time: float = 0.0) -> float:
    fn()                                     # warm-up (kernel selection, caches)
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < repeat or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 50 * repeat:
            break
    return statistics.median(times) * 1e3


def make_layer(lin: nn.Linear, x_cal: torch.Tensor, wbits: int, abits: int, frac: float, group: int | None,
               kernel: str) -> IntegerLinear:
    k = lin.in_features
    wspec = QuantSpec(wbits, True, "group", group) if group else QuantSpec(wbits, True, "channel")
    act = ActivationConfig(QuantSpec(abits, True, "token"), dynamic=True)
    n_out = round(frac * k)
    idx = torch.topk(x_cal.abs().amax(0), n_out).indices.sort().values if n_out else None
    q = QuantLinear.from_linear(lin, wspec, act, outlier_idx=idx, dabc="dense" if n_out else "none")
    return IntegerLinear(q, kernel)


def profile(il: IntegerLinear, x: torch.Tensor, repeat: int) -> dict[str, float]:
    """Median ms of the stages of one forward."""
    x2 = x.float()
    t_q = timeit(lambda: il._quantize(x2), repeat)
    codes, _, _, resid = il._quantize(x2)

    def gemm():                      # symmetric activations: no zero-point term
        if len(il.bounds) > 1 and codes.shape[0] * len(il.bounds) <= il.blockdiag_rows:
            return il._grouped_few_rows(codes, None)
        return il._grouped_loop(codes, None, len(il.bounds) == 1)
    t_g = timeit(gemm, repeat)
    t_s = timeit(lambda: resid @ il.w_side.T, repeat) if resid is not None else 0.0
    return {"quantize": t_q, "gemm+scale": t_g, "dabc": t_s}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 128, 512, 2048])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kernel", default="auto-fast", help="integer kernel for the W4A4 rows: auto-fast (FBGEMM for "
                    "M <= 64, oneDNN above), auto (FBGEMM only, one weight copy), fbgemm, onednn, int_mm")
    ap.add_argument("--int-mm-max-m", type=int, default=128, help="largest M timed with torch._int_mm")
    ap.add_argument("--no-groups", action="store_true", help="skip the group-128 row")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lin = nn.Linear(args.k, args.n, bias=False)
    x_cal = torch.randn(256, args.k)
    x_cal[:, torch.randperm(args.k)[: args.k // 50]] *= 20           # some outlier channels
    kernels = available_kernels()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, integer kernels available: {kernels}")
    variants: dict[str, IntegerLinear] = {}
    for frac in (0.0, 0.02, 0.05):
        variants[f"W4A4 dabc {int(frac * 100)}%"] = make_layer(lin, x_cal, 4, 4, frac, None, args.kernel)
    if not args.no_groups:
        variants["W4A4 g128"] = make_layer(lin, x_cal, 4, 4, 0.0, 128, args.kernel)
    variants["W8A8 int_mm"] = make_layer(lin, x_cal, 8, 8, 0.0, None, "int_mm")
    if "onednn" in kernels:
        variants["W8A8 onednn"] = make_layer(lin, x_cal, 8, 8, 0.0, None, "onednn")
    names = ["fp32"] + list(variants)
    rows = []
    for m in args.m:
        x = torch.randn(m, args.k)
        x[:, torch.randperm(args.k)[: args.k // 50]] *= 20
        fns = {"fp32": lambda x=x: torch.nn.functional.linear(x, lin.weight)}
        for name, il in variants.items():
            if not (name.endswith("int_mm") and m > args.int_mm_max_m):
                fns[name] = lambda il=il, x=x: il(x)
        times: dict[str, list[float]] = {n: [] for n in fns}
        with torch.no_grad():
            for fn in fns.values():
                fn()                                           # warm-up
            for _ in range(args.repeat):                       # interleaved rounds: load drift hits all alike
                for n, fn in fns.items():
                    t = time.perf_counter()
                    fn()
                    times[n].append((time.perf_counter() - t) * 1e3)
        res = {n: min(times[n]) if n in times else float("nan") for n in names}
        med = {n: statistics.median(times[n]) if n in times else float("nan") for n in names}
        rows.append((m, res))
        print(f"M={m:5d}  best " + "  ".join(f"{k}={v:.2f}ms" for k, v in res.items() if not math.isnan(v)))
        print("         median " + "  ".join(f"{k}={v:.2f}ms" for k, v in med.items() if not math.isnan(v)),
              flush=True)
        if args.profile:
            for name in ("W4A4 dabc 0%", "W4A4 dabc 2%", "W4A4 g128"):
                if name in variants:
                    p = profile(variants[name], x, args.repeat)
                    print(f"    profile {name:<14} " + "  ".join(f"{k}={v:.2f}ms" for k, v in p.items()))
    print()
    w = max(len(n) for n in names) + 2
    print("ms (best of interleaved rounds)")
    print("".ljust(8) + "".join(n.rjust(w) for n in names))
    for m, res in rows:
        print(f"M={m:<6}" + "".join(f"{res[n]:{w}.2f}" for n in names))
    print("\nspeed-up over fp32")
    for m, res in rows:
        print(f"M={m:<6}" + "".join(f"{res['fp32'] / res[n]:{w}.2f}x" if not math.isnan(res[n]) else "skipped".rjust(w + 1)
                                    for n in names))


if __name__ == "__main__":
    main()

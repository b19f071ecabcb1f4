#!/usr/bin/env python
"""Peak resident memory of quantization against the fp32 model size (issue 7, "memory bound").

Every variant runs in a fresh subprocess (``OMP_NUM_THREADS`` = ``--threads``, default 1); the parent reads the
child's ``ru_maxrss`` from ``os.wait4`` (the kernel's peak RSS of that process alone) and samples its RSS from
``/proc/<pid>/status`` every ``--interval`` seconds. The child prints phase markers (CLOCK_MONOTONIC is shared
between processes), so the sampled peak is also split by phase: loading, building the calibration set, and
``quantize``.

Variants:

* ``load``        — load the model and build the calibration set only (the floor every variant pays);
* ``api``         — ``morphoquant.quantize(model, recipe, samples)`` (the Python API, quantizes in place);
* ``api-offload`` — the same with ``recipe.offload = True`` (captured block inputs kept on disk);
* ``cli``         — ``morphoquant quantize MODEL -r RECIPE --calib N --seq-len L --eval-size 2 --no-save``
  (the CLI keeps the fp32 model for evaluation next to the quantized copy, so it is not bounded by 2×).

The bound: ``peak ≤ --bound × fp32 bytes`` with fp32 bytes = (number of distinct parameters) × 4.

    OMP_NUM_THREADS=1 python scripts/bench_memory.py                       # qwen2.5-0.5b, rtn-w4a4, 16 × 512
    python scripts/bench_memory.py --variants api --json /tmp/mem.json
    python scripts/bench_memory.py --tiny llama --calib 2 --seq-len 32     # smoke test, no real model needed
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2 ** 20
VARIANTS = ("load", "api", "api-offload", "cli")


# ------------------------------------------------------------------ child side
def _mark(phase: str, **extra) -> None:
    print(json.dumps({"phase": phase, "t": time.monotonic(), **extra}), flush=True)


def _child(args) -> int:
    import resource

    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "src"))
    _mark("start")
    if args.tiny:
        from morphoquant.models.tiny import tiny_model
        model, make = tiny_model(args.tiny)
        _mark("loaded")
        kw = {"seq_len": args.seq_len} if _takes_seq_len(make) else {}
        samples = [make(seed=i, **kw) for i in range(args.calib)]
    else:
        from morphoquant.eval.tasks import task_for
        from morphoquant.zoo import load_model
        model, tok = load_model(args.model)
        _mark("loaded")
        samples = task_for(model, tok, seq_len=args.seq_len).calibration_samples(args.calib, args.seq_len, 0)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = sum(int(s["input_ids"].numel()) for s in samples if "input_ids" in s)
    _mark("calibration", n_params=n_params, fp32_bytes=4 * n_params, samples=len(samples), tokens=tokens)
    if args.variant in ("api", "api-offload"):
        from morphoquant import load_recipe, quantize
        recipe = load_recipe(args.recipe)
        recipe.offload = args.variant == "api-offload"
        t = time.time()
        report = quantize(model, recipe, samples, progress=False, log_path=args.log)
        _mark("quantized", seconds=time.time() - t, report_peak_rss_mb=report.peak_rss_mb)
    _mark("end", ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return 0


def _takes_seq_len(make) -> bool:
    import inspect
    try:
        return "seq_len" in inspect.signature(make).parameters
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------ parent side
def _rss_mb(pid: int) -> tuple[float, float, float] | None:
    """(VmRSS, RssAnon, RssFile) of ``pid`` in MiB: anonymous memory vs pages of mapped files (the weights
    that transformers maps from model.safetensors count as RssFile)."""
    vals = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                    k, v = line.split(":")
                    vals[k] = int(v.split()[0]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    if "VmRSS" not in vals:
        return None
    return vals["VmRSS"], vals.get("RssAnon", 0.0), vals.get("RssFile", 0.0)


def _command(args, variant: str) -> list[str]:
    if variant == "cli":
        cmd = [sys.executable, "-m", "morphoquant", "--quiet", "--threads", str(args.threads), "quantize",
               args.model, "-r", args.recipe, "--calib", str(args.calib), "--seq-len", str(args.seq_len),
               "--eval-size", "2", "--no-save"]
        return cmd
    cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--recipe", args.recipe,
           "--calib", str(args.calib), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
    if args.tiny:
        cmd += ["--tiny", args.tiny]
    if args.log:
        cmd += ["--log", args.log]
    return cmd


def measure(args, variant: str) -> dict:
    """Run one variant in a fresh process; peak RSS from wait4 and from sampling, split by phase."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = _command(args, variant)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    samples: list[tuple[float, float, float, float]] = []     # (t, rss, anon, file)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    err: list[str] = []
    ereader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    ereader.start()
    status = rusage = None
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        r = _rss_mb(proc.pid)
        if r is not None:
            samples.append((time.monotonic(), *r))
        time.sleep(args.interval)
    reader.join()
    ereader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed ({proc.returncode}): {' '.join(cmd)}\n{''.join(err)[-3000:]}")
    marks = {}
    for line in lines:
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict) and "phase" in d:
            marks[d["phase"]] = d
    out = {"variant": variant, "command": " ".join(cmd), "wall_s": round(time.monotonic() - t0, 1),
           "ru_maxrss_mb": round(rusage.ru_maxrss / 1024, 1),
           "sampled_peak_mb": round(max((r for _, r, _, _ in samples), default=0.0), 1),
           "sampled_peak_anon_mb": round(max((a for _, _, a, _ in samples), default=0.0), 1),
           "sampled_peak_file_mb": round(max((f for _, _, _, f in samples), default=0.0), 1)}
    if samples:
        _, r, a, f = max(samples, key=lambda x: x[1])
        out["at_peak_anon_file_mb"] = [round(a, 1), round(f, 1)]
    bounds = [("load", "start", "loaded"), ("calibration_set", "loaded", "calibration"),
              ("quantize", "calibration", "quantized")]
    for name, a, b in bounds:
        if a in marks and b in marks:
            seg = [r for t, r, _, _ in samples if marks[a]["t"] <= t <= marks[b]["t"]]
            out[f"sampled_peak_{name}_mb"] = round(max(seg, default=0.0), 1)
    if "calibration" in marks:
        c = marks["calibration"]
        out.update(n_params=c["n_params"], fp32_mb=round(c["fp32_bytes"] / MIB, 1), samples=c["samples"],
                   tokens=c["tokens"])
        out["rss_before_quantize_mb"] = round(max((r for t, r, _, _ in samples if t <= c["t"]), default=0.0), 1)
    if "quantized" in marks:
        out["quantize_s"] = round(marks["quantized"]["seconds"], 1)
        out["report_peak_rss_mb"] = round(marks["quantized"]["report_peak_rss_mb"], 1)
    if args.cli_output and variant == "cli":
        out["stdout_tail"] = "".join(lines)[-1500:]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-0.5b", help="zoo name or local HF directory")
    p.add_argument("--tiny", default=None, help="a tiny random model architecture instead (smoke test)")
    p.add_argument("--recipe", default="rtn-w4a4")
    p.add_argument("--calib", type=int, default=16, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--bound", type=float, default=2.0, help="stated bound, in multiples of the fp32 model size")
    p.add_argument("--interval", type=float, default=0.05, help="RSS sampling period (s)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--cli-output", action="store_true", help="keep the CLI's printed table in the results")
    p.add_argument("--log", default=None,
                   help="per-layer JSON-lines log of the quantization (api variants): follow a long run's progress")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.variant = args.child
        return _child(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {VARIANTS}")
    if args.tiny and "cli" in variants:
        variants.remove("cli")     # the CLI loads zoo models only
    results = []
    fp32_mb = None
    for v in variants:
        r = measure(args, v)
        fp32_mb = r.get("fp32_mb", fp32_mb)
        results.append(r)
        print(json.dumps(r), flush=True)
    print()
    print(f"model {args.tiny or args.model}  recipe {args.recipe}  calibration {args.calib} x {args.seq_len} tokens  "
          f"threads {args.threads}")
    if fp32_mb:
        print(f"fp32 model size {fp32_mb:.0f} MiB; bound {args.bound:g}x = {args.bound * fp32_mb:.0f} MiB")
    print(f"{'variant':<12} {'ru_maxrss MiB':>13} {'x fp32':>7} {'sampled MiB':>11} {'anon+file at peak':>17} "
          f"{'quantize s':>10}  within bound")
    ok = True
    for r in results:
        ratio = r["ru_maxrss_mb"] / fp32_mb if fp32_mb else float("nan")
        r["x_fp32"] = round(ratio, 3)
        r["within_bound"] = bool(ratio <= args.bound)
        if r["variant"] != "cli":
            ok &= r["within_bound"]
        anon, file = r.get("at_peak_anon_file_mb", (float("nan"), float("nan")))
        print(f"{r['variant']:<12} {r['ru_maxrss_mb']:>13.0f} {ratio:>7.2f} {r['sampled_peak_mb']:>11.0f} "
              f"{f'{anon:.0f}+{file:.0f}':>17} {r.get('quantize_s', float('nan')):>10.1f}  "
              f"{'yes' if r['within_bound'] else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bound_x_fp32": args.bound, "fp32_mb": fp32_mb,
                                               "results": results}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

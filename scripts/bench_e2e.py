#!/usr/bin/env python
"""End-to-end prefill / decode time, peak memory and checkpoint size: fp32 vs a saved-and-reloaded W4A4 model.

Steps (each measurement in a fresh subprocess, so peak RSS is per variant):

1. ``quantize``: load the model (``morphoquant.zoo.load_model``, default ``smollm2-135m``; or ``--tiny ARCH`` for
   a tiny random model), quantize it with ``--recipe`` (default ``rtn-w4a4``) on a few calibration windows, and
   ``save_quantized`` it to ``--out`` (the size report gives bytes/param and the ratio to fp16);
2. memory, one subprocess per variant: load, one prefill of ``--prompt-len`` tokens and ``--decode`` decode
   steps; load time, RSS after loading and peak RSS. Variants: ``fp32``; ``w4a4`` =
   ``load_quantized(out, runtime="integer")`` (int8 kernels, bit-exact with fake-quant); ``w4a4-fake`` (``--fake``)
   = the fake-quant ``QuantLinear`` path;
3. time, all variants in one subprocess, in interleaved rounds (a shared machine's load then hits them alike):
   best and median prefill time and per-token decode time (KV cache).

    python scripts/bench_e2e.py                                  # smollm2-135m
    python scripts/bench_e2e.py --model qwen2.5-0.5b --threads 2
    python scripts/bench_e2e.py --tiny llama --prompt-len 32     # smoke test, no real model needed
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CALIB_TEXT = ("The quick brown fox jumps over the lazy dog. Post-training quantization maps the weights and "
              "activations of a trained network to low-bit integers without retraining. ") * 40


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _trim() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS shows live memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(args):
    import torch

    if args.tiny:
        from morphoquant.models.tiny import tiny_model

        model, _ = tiny_model(args.tiny)
        return model, None, 1024
    from morphoquant.zoo import load_model

    model, tok = load_model(args.model, dtype=torch.float32)
    return model, tok, model.config.vocab_size


def _ids(vocab: int, n: int, seed: int, tok=None):
    import torch

    if tok is not None:
        ids = tok(CALIB_TEXT, return_tensors="pt")["input_ids"][:, :n]
        if ids.shape[1] >= n:
            return ids
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, min(vocab, 30000), (1, n), generator=g)


def step_quantize(args) -> dict:
    import torch

    from morphoquant import quantize
    from morphoquant.export import save_quantized

    model, tok, vocab = _load(args)
    samples = []
    for i in range(args.calib):
        ids = _ids(vocab, args.calib_len, i, tok if i == 0 else None)
        samples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    from morphoquant.pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, json.loads(args.override) if args.override else None)
    t = time.perf_counter()
    quantize(model, recipe, samples, progress=False)
    tq = time.perf_counter() - t
    rep = save_quantized(model, args.out, recipe, {"source": "bench_e2e", "windows": args.calib,
                                                        "seq_len": args.calib_len},
                         tokenizer=tok, overwrite=True, verbose=True, float_dtype=args.float_dtype)
    return {"quantize_s": tq, "checkpoint_bytes": rep.checkpoint_bytes, "fp16_bytes": rep.fp16_bytes,
            "bytes_per_param": rep.bytes_per_param, "ratio_vs_fp16": rep.ratio_vs_fp16, "serving": rep.serving,
            "n_params": rep.n_params}


def _load_variant(args, variant: str):
    t = time.perf_counter()
    if variant == "fp32":
        model, _, vocab = _load(args)
    else:
        from morphoquant.export import load_quantized

        model = load_quantized(args.out, runtime="integer" if variant == "w4a4" else None, kernel=args.kernel)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        vocab = cfg.vocab_size
    return model.eval(), vocab, time.perf_counter() - t


def _kw(model) -> dict:
    """Prefill as ``generate`` does it: logits of the last position only (when the model supports it)."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def step_memory(args, variant: str) -> dict:
    """Load one variant and run one prefill + the decode steps: load time, RSS and peak RSS of this process."""
    import torch

    model, vocab, load_s = _load_variant(args, variant)
    _trim()
    rss_loaded = rss_mb()
    ids = _ids(vocab, args.prompt_len, 123)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **_kw(model))
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(args.decode):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return {"variant": variant, "load_s": load_s, "rss_loaded_mb": rss_loaded, "peak_rss_mb": peak_mb()}


def step_time(args, variants: list[str]) -> dict:
    """All variants in one process, timed in interleaved rounds so that load on a shared machine hits them alike."""
    import torch

    models = {}
    vocab = None
    for v in variants:
        models[v], vocab, _ = _load_variant(args, v)
    ids = _ids(vocab, args.prompt_len, 123)
    pre = {v: [] for v in variants}
    dec = {v: [] for v in variants}
    with torch.no_grad():
        for m in models.values():
            m(input_ids=ids, use_cache=True, **_kw(m))            # warm-up
        for _ in range(args.repeat):
            for v, m in models.items():
                t = time.perf_counter()
                m(input_ids=ids, use_cache=True, **_kw(m))
                pre[v].append(time.perf_counter() - t)
        state = {}
        for v, m in models.items():
            out = m(input_ids=ids, use_cache=True, **_kw(m))
            state[v] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
        for _ in range(args.decode):
            for v, m in models.items():
                past, nxt = state[v]
                t = time.perf_counter()
                out = m(input_ids=nxt, past_key_values=past, use_cache=True)
                dec[v].append(time.perf_counter() - t)
                state[v] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
    return {v: {"prefill_ms": min(pre[v]) * 1e3, "prefill_ms_median": statistics.median(pre[v]) * 1e3,
                "decode_ms": min(dec[v]) * 1e3, "decode_ms_median": statistics.median(dec[v]) * 1e3}
            for v in variants}


def _child(args, step: str) -> dict:
    cmd = [sys.executable, __file__, "--_step", step] + [a for a in sys.argv[1:] if a != "--_step"]
    if "--out" not in sys.argv:
        cmd += ["--out", str(args.out)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        sys.stderr.write(r.stdout + r.stderr)
        raise SystemExit(f"step {step} failed")
    sys.stdout.write("".join(line + "\n" for line in r.stdout.splitlines() if not line.startswith("@@")))
    return json.loads(next(line[2:] for line in r.stdout.splitlines() if line.startswith("@@")))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="zoo name, local HF directory or hub id")
    ap.add_argument("--tiny", default=None, help="use a tiny random model of this arch instead (smoke test)")
    ap.add_argument("--recipe", default="rtn-w4a4")
    ap.add_argument("--override", default=None, help='JSON recipe overrides, e.g. \'{"weights": {"granularity": '
                    '"channel"}}\'')
    ap.add_argument("--out", default=None, help="checkpoint directory (default: a temporary one)")
    ap.add_argument("--float-dtype", default="float16", help="dtype of the non-quantized tensors on disk "
                    "(embeddings, norms, lm_head); float32 keeps them bit-exact")
    ap.add_argument("--calib", type=int, default=4)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kernel", default="auto", help="integer kernel: auto (one weight copy), auto-fast, fbgemm, "
                    "onednn, int_mm")
    ap.add_argument("--fake", action="store_true", help="also time the fake-quant QuantLinear path")
    ap.add_argument("--skip-quantize", action="store_true", help="reuse an existing --out checkpoint")
    ap.add_argument("--_step", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args._step:
        if args._step == "quantize":
            res = step_quantize(args)
        elif args._step.startswith("mem:"):
            res = step_memory(args, args._step[4:])
        else:
            res = step_time(args, args._step[5:].split(","))
        print("@@" + json.dumps(res))
        return
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="mq-e2e-")
        args.out = str(Path(tmp.name) / "ckpt")
    name = args.tiny and f"tiny-{args.tiny}" or args.model
    print(f"model {name}, recipe {args.recipe} {args.override or ''}, prompt {args.prompt_len} tokens, {args.decode} decode steps, "
          f"threads {args.threads or 'default'}")
    q = _child(args, "quantize") if not args.skip_quantize else None
    variants = ["fp32", "w4a4"] + (["w4a4-fake"] if args.fake else [])
    mem = {v: _child(args, f"mem:{v}") for v in variants}
    tm = _child(args, "time:" + ",".join(variants))
    print()
    if q:
        print(f"checkpoint: {q['checkpoint_bytes'] / 2**20:.1f} MiB = {q['bytes_per_param']:.3f} bytes/param, "
              f"{q['ratio_vs_fp16']:.3f}x the fp16 checkpoint ({q['fp16_bytes'] / 2**20:.1f} MiB); "
              f"{q['serving']} format; quantized in {q['quantize_s']:.1f} s")
    print(f"times: best (median) of {args.repeat} interleaved prefills and {args.decode} interleaved decode steps")
    print(f"{'variant':<11}{'load s':>8}{'prefill ms':>20}{'tok/s':>9}{'decode ms/tok':>20}{'RSS MiB':>10}"
          f"{'peak MiB':>10}")
    for v in variants:
        t, mm = tm[v], mem[v]
        print(f"{v:<11}{mm['load_s']:8.2f}{t['prefill_ms']:11.1f} ({t['prefill_ms_median']:6.1f})"
              f"{args.prompt_len / t['prefill_ms'] * 1e3:9.1f}{t['decode_ms']:11.2f} ({t['decode_ms_median']:6.2f})"
              f"{mm['rss_loaded_mb']:10.0f}{mm['peak_rss_mb']:10.0f}")
    f = tm["fp32"]
    for v in variants[1:]:
        print(f"{v} vs fp32: prefill {f['prefill_ms'] / tm[v]['prefill_ms']:.2f}x, decode "
              f"{f['decode_ms'] / tm[v]['decode_ms']:.2f}x, peak RSS {mem[v]['peak_rss_mb'] / mem['fp32']['peak_rss_mb']:.2f}x")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()

"""``morphoquant`` command line: quantize, eval, inspect, recipes, zoo.

The default ``morphoquant quantize`` is the project's main job: it quantizes the real offline SmolLM2-135M
(W4A4, round-to-nearest and MorphoQuant), evaluates Wikipedia perplexity against full precision on the disjoint
evaluation split and prints one table with the time taken.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_RECIPES = ["rtn-w4a4", "rtn-w4a4-static", "morpho-plus"]

log = logging.getLogger("morphoquant")


class CLIError(Exception):
    """An error shown to the user as one clear line (no traceback)."""


def _parse_set(values: list[str]) -> dict:
    """``--set options.k=3 --set weights.group_size=128`` → nested dict (values parsed as YAML scalars)."""
    import yaml
    out: dict = {}
    for item in values or []:
        if "=" not in item:
            raise CLIError(f"--set expects KEY=VALUE, got {item!r}")
        key, val = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(val)
    return out


def _parse_modalities(value: str | None) -> list[str] | None:
    """``--calib-modalities image,audio,text`` → ``["image", "audio", "text"]`` (checked before loading)."""
    if value is None:
        return None
    from ..statistics.modality import MODALITY_NAMES
    mods = [m.strip().lower() for m in value.split(",") if m.strip()]
    bad = [m for m in mods if m not in MODALITY_NAMES]
    if not mods or bad:
        raise CLIError(f"--calib-modalities expects a comma-separated list of {', '.join(MODALITY_NAMES)} "
                       f"(e.g. image,audio,text), got {value!r}")
    return mods


def _setup_logging(args) -> None:
    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


def _load(model_ref: str):
    from ..zoo import load_model
    t = time.time()
    model, proc = load_model(model_ref)
    log.info("loaded %s (%s, %.1f M params) in %.1f s", model_ref, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, time.time() - t)
    return model, proc


# what `quantize --out` writes in a recipe's directory (run.json, the manifest, last)
RUN_FILES = {".resume", "layers.jsonl", "recipe.yaml", "report.json", "channels.safetensors", "checkpoint", "run.json"}


def _check_out_dir(out: Path, model_ref: str, recipe_name: str, overwrite: bool) -> None:
    """Refuse to mix runs: an existing output dir must hold the same model and recipe (or --overwrite)."""
    manifest = out / "run.json"
    if not out.exists() or not any(out.iterdir()):
        return
    if not manifest.exists():
        if overwrite or {p.name for p in out.iterdir()} <= RUN_FILES:
            return          # empty of foreign files: an unfinished run of ours (killed, disk full): resume it
        raise CLIError(f"output directory {out} is not empty and was not written by morphoquant; choose another "
                       "--out or pass --overwrite")
    prev = json.loads(manifest.read_text())
    if (prev.get("model"), prev.get("recipe")) != (model_ref, recipe_name) and not overwrite:
        raise CLIError(f"output directory {out} already holds {prev.get('model')} quantized with "
                       f"{prev.get('recipe')}; choose another --out or pass --overwrite")


def _write_json(path: Path, data) -> None:
    from ..utils.atomic import atomic_write_text
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def _dry_run(model, recipe, adapter) -> None:
    for stack in adapter.stacks():
        on = recipe.stack_enabled(stack.name, stack.default_enabled)
        w, a = recipe.stack_formats(stack.name)
        scope = getattr(stack, "modality", None)
        print(f"stack {stack.name}: {'QUANTIZE' if on else 'keep 16-bit'}; {len(stack.blocks)} blocks; modality "
              f"{scope.label if scope is not None else 'mixed (per-token masks)'}")
        if not on:
            continue
        abits = "A16" if a is None else f"A{a.spec.bits} {a.spec.granularity} {'dynamic' if a.dynamic else 'static'}"
        wdesc = f"W{w.bits} {w.granularity}{w.group_size or ''} {w.fmt}"
        names = list(stack.linears(stack.blocks[0]))
        names = [n for n in names if not any(n.endswith(s) for s in recipe.ignore)]
        print(f"  per block: {', '.join(names)}  [{wdesc}, {abits}, method {recipe.method}]")
    print("never quantized: " + ", ".join(adapter.protected_module_names()))


def cmd_quantize(args) -> int:
    import torch

    from ..api import quantize
    from ..eval.tasks import task_for
    from ..models import get_adapter
    from ..pipeline.recipe import load_recipe
    from ..utils.memory import peak_rss_mb, reset_peak_rss

    torch.manual_seed(args.seed)
    overrides = _parse_set(args.set)
    recipes = [load_recipe(r, overrides) for r in (args.recipe or DEFAULT_RECIPES)]
    if getattr(args, "sanity", False):
        recipes += _sanity_recipes(recipes, overrides)
    for r in recipes:
        if args.calib is not None:
            r.calibration.num_samples = args.calib
        if args.seq_len is not None:
            r.calibration.seq_len = args.seq_len
        r.calibration.seed = args.seed
    calib_modalities = _parse_modalities(args.calib_modalities)
    model, proc = _load(args.model)
    adapter = get_adapter(model)
    if args.dry_run:
        for r in recipes:
            print(f"== recipe {r.name}")
            _dry_run(model, r, adapter)
        return 0
    task = task_for(model, proc, eval_windows=args.eval_size, seq_len=args.seq_len or 512)
    if calib_modalities:
        restrict = getattr(task, "restrict_calibration_modalities", None)
        if restrict is None:
            raise CLIError(f"--calib-modalities: the {task.kind} task of {args.model} has a fixed calibration mix "
                           "(only multimodal tasks such as omnimini's can be restricted); drop the option")
        log.info("calibration restricted to %s: %s", ",".join(calib_modalities), ", ".join(restrict(calib_modalities)))
    rows = []
    fp_metrics = None
    if not args.no_eval:
        t = time.time()
        fp_metrics = task.evaluate(model, progress=not args.quiet)
        rows.append({"recipe": "fp32", task.metric: fp_metrics[task.metric], "seconds_eval": time.time() - t,
                     "metrics": fp_metrics})
        log.info("FP32 %s = %.4g", task.metric, fp_metrics[task.metric])
    calib_cache: dict = {}
    out_root = Path(args.out) if args.out else None
    failures, recipe_failures = [], _recipe_failures()
    for recipe in recipes:
        out = out_root / recipe.name if out_root else None
        if args.cmd == "compare" and out and not args.overwrite and not args.no_eval:
            prev = _finished_row(out, args.model, recipe, task)
            if prev is not None:
                log.info("== %s: finished earlier with the same recipe, data and task: row reused "
                         "(--overwrite re-runs it)", recipe.name)
                if fp_metrics and fp_metrics[task.metric]:
                    prev["x_fp"] = prev[task.metric] / fp_metrics[task.metric]
                rows.append(prev)
                continue
        key = (recipe.calibration.num_samples, recipe.calibration.seq_len, recipe.calibration.seed)
        if key not in calib_cache:
            calib_cache[key] = task.calibration_samples(*key)
        samples = calib_cache[key]
        reset_peak_rss()        # each row's peak memory is its own, not the largest of the rows before it
        qmodel = copy.deepcopy(model)
        if out:
            _check_out_dir(out, args.model, recipe.name, args.overwrite)
            out.mkdir(parents=True, exist_ok=True)
            (out / "run.json").unlink(missing_ok=True)     # this run replaces the previous one: not complete yet
            if not (out / ".resume" / "progress.json").exists():
                (out / "layers.jsonl").unlink(missing_ok=True)
        log.info("== %s: %s", recipe.name, recipe.description.strip())
        # with --out, a checkpoint after every block: re-running the same command resumes an interrupted run
        resume_dir = out / ".resume" if out else None
        try:
            report = quantize(qmodel, recipe, samples, log_path=out / "layers.jsonl" if out else None,
                              progress=not args.quiet, resume_dir=resume_dir)
        except recipe_failures as e:
            if args.cmd != "compare":
                raise
            # one method that cannot run on this model must not cost the rest of the table
            msg = str(e).splitlines()[0]
            log.error("%s failed: %s", recipe.name, msg)
            rows.append({"recipe": recipe.name, "error": f"{type(e).__name__}: {msg}"})
            failures.append(recipe.name)
            del qmodel
            continue
        row = {"recipe": recipe.name, "calib_seconds": report.seconds, "peak_rss_mb": peak_rss_mb()}
        row.update(_bit_summary(report))
        if not args.no_eval:
            t = time.time()
            m = task.evaluate(qmodel, reference=model, progress=not args.quiet)
            row[task.metric] = m[task.metric]
            row["seconds_eval"] = time.time() - t
            if fp_metrics:
                row["x_fp"] = m[task.metric] / fp_metrics[task.metric] if fp_metrics[task.metric] else None
            row["metrics"] = m
        rows.append(row)
        if out:
            _write_run_outputs(out, qmodel, proc, recipe, samples, args, row, fp_metrics, report, task)
            import shutil
            shutil.rmtree(resume_dir, ignore_errors=True)
        del qmodel
    _print_table(rows, task, args)
    if out_root:
        _write_json(out_root / "summary.json", rows)
    if args.cmd == "compare":
        _write_compare(rows, recipes, task, args, Path(args.out))
    if out_root:
        _write_report(out_root)
    if failures:
        print("morphoquant: these recipes could not run (see the error column): " + ", ".join(failures),
              file=sys.stderr)
        return 4
    if args.cmd == "compare" and any(r.get("sanity") == "FAIL" for r in rows):
        print("morphoquant: W8A8 sanity check failed for: " +
              ", ".join(r["recipe"] for r in rows if r.get("sanity") == "FAIL"), file=sys.stderr)
        return 3
    return 0


def _recipe_failures() -> tuple:
    """Errors that mean "this method cannot run on this model" (compare records them and goes on)."""
    from ..methods.channel_scaling import FoldVerificationError
    from ..methods.quarot import UnsupportedRotationError
    from ..numerics import QuantConfigError
    from ..pipeline.recipe import RecipeError
    from ..statistics import NonFiniteActivationError
    return (RecipeError, UnsupportedRotationError, FoldVerificationError, NonFiniteActivationError, QuantConfigError)


def _settings(recipe_yaml: str):
    """A resolved recipe's settings: everything but its description, which is prose (rewording a recipe's
    description must not re-run hours of finished rows). The saved YAML is validated again first, so a setting
    added to the recipe schema since the row ran takes its default (which keeps the earlier behaviour) instead
    of making every finished row look different."""
    import yaml

    from ..pipeline.recipe import Recipe
    try:
        d = yaml.safe_load(recipe_yaml)
    except yaml.YAMLError:
        return None
    if isinstance(d, dict):
        try:
            d = Recipe.model_validate(d).model_dump(mode="json")
        except ValueError:
            pass            # not a valid recipe any more: compared as written, so it never matches a valid one
        d.pop("description", None)
    return d


def _finished_row(out: Path, model_ref: str, recipe, task) -> dict | None:
    """The table row of an earlier finished run in ``out`` of the same model, the same recipe (every setting,
    calibration included) and the same evaluation task; None when anything differs or a file is missing."""
    try:
        run = json.loads((out / "run.json").read_text())
        saved = (out / "recipe.yaml").read_text()
        rep = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    task_now = json.loads(json.dumps(task.describe(), default=str))
    if (run.get("model"), run.get("recipe")) != (model_ref, recipe.name) \
            or _settings(saved) != _settings(recipe.to_yaml()) or rep.get("task") != task_now:
        return None
    row = rep.get("row") or {}
    return dict(row) if row.get(task.metric) is not None else None


def _write_run_outputs(out: Path, qmodel, proc, recipe, samples, args, row, fp_metrics, report, task) -> None:
    """Every file of a finished recipe run, ``run.json`` last. If one cannot be written (e.g. the disk is full)
    the ones written so far are removed again: a directory without ``run.json`` holds only the layer log and
    the resume checkpoint, and re-running the same command finishes it from that checkpoint."""
    from ..pipeline.runner import environment_versions
    from ..utils.atomic import atomic_write_text
    written = [out / "recipe.yaml", out / "report.json", out / "channels.safetensors", out / "checkpoint"]
    try:
        atomic_write_text(out / "recipe.yaml", recipe.to_yaml())
        _write_json(out / "report.json", {"row": row, "fp": fp_metrics, "quantization": report.to_dict(),
                                          "task": task.describe()})
        _save_channels(out / "channels.safetensors", report.channels)
        if not args.no_save:
            _save_checkpoint(qmodel, proc, out, recipe, samples, args)
        _write_json(out / "run.json", {"model": args.model, "recipe": recipe.name,
                                       "versions": environment_versions(), "command": sys.argv})
    except BaseException:
        import shutil
        for p in written:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        raise


SANITY_SUFFIX = "@w8a8"
SANITY_TOLERANCE = 0.05


def _sanity_recipes(recipes, overrides) -> list:
    """One W8A8 variant per method in the list: a method that collapses at W8A8 has a bug.

    ``overrides`` were already applied to ``recipes``; the variants inherit them."""
    from ..pipeline.recipe import parse_recipe, with_format
    out, seen = [], set()
    for r in recipes:
        if r.method in seen or r.name.endswith(SANITY_SUFFIX):
            continue
        seen.add(r.method)
        data = with_format(r.model_dump(mode="json"), "w8a8", r.name)
        data["name"] = f"{r.method}{SANITY_SUFFIX}"
        out.append(parse_recipe(data, f"{r.name} (W8A8 sanity variant)"))
    return out


def _write_compare(rows, recipes, task, args, out: Path) -> None:
    """The comparison table as Markdown, CSV and JSON, with the exact command and versions."""
    import csv
    import io

    from ..pipeline.runner import environment_versions
    by_name = {r.name: r for r in recipes}
    metric = task.metric
    fp = next((r.get(metric) for r in rows if r["recipe"] == "fp32"), None)
    table = []
    for r in rows:
        rec = by_name.get(r["recipe"])
        w = a = ""
        if rec is not None:
            w = f"W{rec.weights.bits}" + (f"g{rec.weights.group_size}" if rec.weights.granularity == "group" else "")
            w += f"-{rec.weights.format}" if rec.weights.format != "int" else ""
            w += "+gptq" if rec.weight_method == "gptq" else ""
            ab = rec.activations.bits
            a = "A16" if ab == 16 else f"A{ab}-{rec.activations.granularity}"
        row = {"recipe": r["recipe"], "method": rec.method if rec else "-", "weights": w, "activations": a,
               metric: r.get(metric), "x_fp": r.get("x_fp"), "effective_act_bits": r.get("effective_act_bits"),
               "outlier_channel_share": r.get("outlier_channel_share"), "calib_seconds": r.get("calib_seconds"),
               "peak_rss_mb": r.get("peak_rss_mb")}
        row.update({k: (r.get("metrics") or {}).get(k) for k in getattr(task, "table_metrics", ())})
        if r.get("error"):
            row["error"] = r["error"]
        if r["recipe"].endswith(SANITY_SUFFIX) and fp:
            worse = (r.get(metric) or 0) / fp if task.lower_is_better else fp / max(r.get(metric) or 1e-9, 1e-9)
            row["sanity"] = r["sanity"] = "ok" if worse <= 1 + SANITY_TOLERANCE else "FAIL"
        table.append(row)
    meta = {"model": args.model, "task": task.describe(), "command": " ".join(sys.argv),
            "versions": environment_versions()}
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "compare.json", {"meta": meta, "rows": table})
    cols = list(table[0].keys()) + [c for c in ("sanity", "error") if any(c in t for t in table)]
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    wr.writeheader()
    wr.writerows(table)
    from ..utils.atomic import atomic_write_text
    atomic_write_text(out / "compare.csv", buf.getvalue())

    def fmt(v):
        return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    md = [f"# Comparison: {args.model} ({task.kind}, {metric})", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(t.get(c)) for c in cols) + " |" for t in table]
    md += ["", f"Command: `{meta['command']}`", "", "Versions: " + ", ".join(f"{k} {v}" for k, v in
                                                                          meta["versions"].items())]
    atomic_write_text(out / "compare.md", "\n".join(md) + "\n")
    print(f"comparison table: {out / 'compare.md'}")


def _write_report(run_dir: Path) -> None:
    """The HTML report is a by-product: failing to draw it never fails the run."""
    try:
        from ..report import build_report
        log.info("report: %s", build_report(run_dir))
    except Exception as e:
        from ..utils.atomic import write_error
        fault = write_error(e, run_dir / "report")
        if fault is not None:       # disk full / read-only: the user must know, not just a warning
            raise fault from e
        log.warning("could not write the HTML report of %s: %s", run_dir, e)


def cmd_report(args) -> int:
    from ..report import build_report
    print(build_report(args.dir, args.out, embed_images=args.embed))
    return 0


def _bit_summary(report) -> dict:
    """MAC-weighted mean effective activation bits and 16-bit channel share over all quantized linears."""
    macs = bits = frac = 0.0
    for rec in report.records:
        for info in rec.linears.values():
            eff = info.get("effective_bits")
            if eff is None:
                continue
            m = float(info.get("channels", 1))
            macs += m
            bits += m * eff
            frac += m * info.get("outlier_fraction", 0.0)
    if not macs:
        return {}
    return {"effective_act_bits": bits / macs, "outlier_channel_share": frac / macs}


def _save_channels(path: Path, channels: dict) -> None:
    """Per-channel arrays of every quantized linear as ``"<layer>|<array>"`` tensors (for reports)."""
    from safetensors.torch import save

    from ..utils.atomic import atomic_write_bytes
    flat = {f"{layer}|{k}": v.detach().float().contiguous() for layer, arrs in channels.items()
            for k, v in arrs.items()}
    atomic_write_bytes(path, save(flat))


def _save_checkpoint(qmodel, proc, out: Path, recipe, samples, args) -> None:
    try:
        from ..export import save_quantized
    except ImportError:  # export layer not available in this build
        log.warning("checkpoint export is not available; skipped")
        return
    import hashlib
    h = hashlib.sha256()
    for s in samples:
        for k in sorted(s):
            h.update(k.encode())
            h.update(s[k].numpy().tobytes())
    manifest = {"model": args.model, "num_samples": recipe.calibration.num_samples,
                "seq_len": recipe.calibration.seq_len, "seed": recipe.calibration.seed,
                "source": "built-in task calibration split", "sha256": h.hexdigest()}
    from ..export.errors import UnsupportedExportError
    # _check_out_dir already refused a directory of another model/recipe: a previous checkpoint here is ours
    try:
        save_quantized(qmodel, out / "checkpoint", recipe, manifest, tokenizer=proc, overwrite=True,
                       verbose=not args.quiet)
    except UnsupportedExportError as e:     # the results stand; only the checkpoint cannot be written
        log.warning("%s: no checkpoint written: %s", recipe.name, e)


def _print_table(rows, task, args) -> None:
    metric = task.metric
    print()
    print(f"model {args.model}  task {task.kind}  metric {metric} ({'lower' if task.lower_is_better else 'higher'} "
          "is better)")
    hdr = f"{'recipe':<22} {metric:>10} {'x FP':>7} {'eff.bits':>8} {'16b ch.':>8} {'calib s':>8} {'peak MB':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        val = r.get(metric)
        if r.get("error"):
            print(f"{r['recipe']:<22} failed: {r['error']}")
            continue
        print(f"{r['recipe']:<22} {'-' if val is None else format(val, '10.3f'):>10} "
              f"{format(r['x_fp'], '7.2f') if r.get('x_fp') else '':>7} "
              f"{format(r['effective_act_bits'], '8.2f') if 'effective_act_bits' in r else '':>8} "
              f"{format(100 * r['outlier_channel_share'], '7.1f') + '%' if 'outlier_channel_share' in r else '':>8} "
              f"{format(r['calib_seconds'], '8.1f') if 'calib_seconds' in r else '':>8} "
              f"{format(r['peak_rss_mb'], '8.0f') if 'peak_rss_mb' in r else '':>8}")


def cmd_eval(args) -> int:
    from ..eval.tasks import task_for
    model, proc = _load_any(args.model)
    task = task_for(model, proc, eval_windows=args.eval_size, seq_len=args.seq_len or 512)
    m = task.evaluate(model, progress=not args.quiet)
    print(json.dumps(m, indent=2, default=str))
    return 0


def _load_any(ref: str):
    """A quantized checkpoint directory (morphoquant manifest) or anything ``zoo.load_model`` accepts."""
    p = Path(ref)
    if p.is_dir() and (p / "morphoquant.json").exists():
        from ..export import load_quantized
        from ..zoo.registry import load_processor
        return load_quantized(p), load_processor(p)
    return _load(ref)


def cmd_inspect(args) -> int:
    import torch

    from ..eval.tasks import task_for
    from ..models import get_adapter
    from ..pipeline.recipe import load_recipe
    from ..pipeline.runner import LayerwiseRunner
    from ..statistics import ActivationCollector

    model, proc = _load(args.model)
    adapter = get_adapter(model)
    task = task_for(model, proc)
    samples = task.calibration_samples(args.calib, args.seq_len or 512, 0)
    recipe = load_recipe("rtn-w4a16")
    runner = LayerwiseRunner(model, adapter.stacks(), recipe, samples, progress=False)
    result = {}
    for stack in adapter.stacks():
        store = runner._capture(stack)
        for bi, block in enumerate(stack.blocks):
            linears = stack.linears(block)
            with ActivationCollector(linears, getattr(stack, "modality", None)) as col:
                for i in range(len(store)):
                    c = store[i]
                    col.current_ids = c.ids
                    col.new_forward()
                    y = runner._run_block(block, c)
                    c.hidden = y
                    store[i] = c
            for name, st in col.stats.items():
                result[f"{stack.name}.{bi}.{name}"] = st.summary()
        store.close()
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {len(result)} layers to {args.out}")
    else:
        for name, s in result.items():
            a = s.get("all", {})
            print(f"{name:<40} absmax/median {a.get('absmax_max_over_median', 0):8.1f}  kurtosis max "
                  f"{a.get('kurtosis_max', 0):8.1f}  modalities {','.join(k for k in s if k != 'all')}")
    del torch
    return 0


def cmd_recipes(args) -> int:
    from ..pipeline.recipe import builtin_recipes, load_recipe
    for name in sorted(builtin_recipes()):
        r = load_recipe(name)
        print(f"{name:<20} {' '.join(r.description.split())}")
    return 0


def cmd_zoo(args) -> int:
    from ..zoo.registry import convert_model, list_models
    if args.fetch:
        for name in args.fetch:
            print(convert_model(name))
        return 0
    for row in list_models():
        print(f"{row['name']:<18} {row.get('architecture', ''):<34} {'converted' if row.get('converted') else '-':<10} "
              f"{row.get('description', '')}")
    return 0


CALIB_MODALITIES_HELP = ("calibrate only on documents of these modalities, comma-separated, e.g. image,text "
                         "(multimodal tasks only; default: the task's full mix)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="morphoquant", description=__doc__.splitlines()[0])
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model with one or more recipes and evaluate it")
    q.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="zoo name, local HF dir or hub id")
    q.add_argument("-r", "--recipe", action="append", help="built-in recipe name or YAML path (repeatable)")
    q.add_argument("--out", help="output directory (one sub-directory per recipe)")
    q.add_argument("--calib", type=int, default=None, help="number of calibration samples")
    q.add_argument("--seq-len", type=int, default=None, help="calibration/evaluation sequence length")
    q.add_argument("--eval-size", type=int, default=8,
                   help="evaluation size: text windows, Whisper sentences, DINOv2 images, OmniMini image-QA items")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE (dotted keys)")
    q.add_argument("--no-eval", action="store_true")
    q.add_argument("--no-save", action="store_true", help="do not write the quantized checkpoint")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--dry-run", action="store_true", help="print what would be quantized and exit")
    q.add_argument("--calib-modalities", help=CALIB_MODALITIES_HELP)
    q.set_defaults(func=cmd_quantize)

    c = sub.add_parser("compare", help="run several recipes on one model and write one comparison table")
    c.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="zoo name, local HF dir or hub id")
    c.add_argument("-r", "--recipe", action="append", help="built-in recipe name or YAML path (repeatable)")
    c.add_argument("--out", required=True, help="output directory (compare.md/.csv/.json + one dir per recipe)")
    c.add_argument("--calib", type=int, default=None)
    c.add_argument("--seq-len", type=int, default=None)
    c.add_argument("--eval-size", type=int, default=16, help="evaluation size (as for quantize)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--set", action="append", default=[])
    c.add_argument("--sanity", action="store_true", help="add a W8A8 variant of every method (must stay near FP)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--calib-modalities", help=CALIB_MODALITIES_HELP)
    c.set_defaults(func=cmd_quantize, no_eval=False, no_save=True, dry_run=False)

    e = sub.add_parser("eval", help="evaluate a model or a quantized checkpoint directory")
    e.add_argument("model")
    e.add_argument("--eval-size", type=int, default=16, help="evaluation size (as for quantize)")
    e.add_argument("--seq-len", type=int, default=None)
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", help="per-layer activation statistics (per modality)")
    i.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    i.add_argument("--calib", type=int, default=4)
    i.add_argument("--seq-len", type=int, default=256)
    i.add_argument("--out", help="write JSON here")
    i.set_defaults(func=cmd_inspect)

    rp = sub.add_parser("report", help="HTML report (plots + tables) of a quantize/compare output directory")
    rp.add_argument("dir", help="the --out directory of quantize/compare (or one recipe sub-directory)")
    rp.add_argument("--out", default=None, help="report directory (default DIR/report)")
    rp.add_argument("--embed", action="store_true", help="embed the figures: one self-contained index.html")
    rp.set_defaults(func=cmd_report)

    r = sub.add_parser("recipes", help="list built-in recipes")
    r.set_defaults(func=cmd_recipes)

    z = sub.add_parser("zoo", help="list or convert the offline real models")
    z.add_argument("--fetch", nargs="*", help="convert these zoo models now")
    z.set_defaults(func=cmd_zoo)
    return p


def _output_fault_message(e: BaseException, args) -> str | None:
    """Disk full / read-only / file too large: the cause, the fix with the flag to change, and whether a
    re-run resumes."""
    from ..utils.atomic import write_error
    if not isinstance(e, OSError):
        return None
    fault = write_error(e, e.filename or ".")
    if fault is None:
        return None
    msg = str(fault)
    if getattr(args, "out", None):
        msg += " (--out)"
        if any(Path(args.out).glob("*/.resume/progress.json")):
            msg += "; then the same command resumes from the last finished block"
    return msg


def _exit_on_sigterm(signum, frame):
    # the default action kills the process on the spot: no finally blocks, no atexit, so temp directories
    # (offloaded activations, half-written outputs) would stay; SystemExit unwinds normally
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():   # signals only reach the main thread
        return _main(args)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args) -> int:
    _setup_logging(args)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from ..data import DataError
    from ..methods import EmptyLayerError
    from ..pipeline.recipe import RecipeError
    from ..pipeline.runner import CalibrationDataError
    from ..statistics import NonFiniteActivationError
    from ..zoo.fetch import ZooError
    known = (CLIError, RecipeError, CalibrationDataError, DataError, ZooError, EmptyLayerError,
             NonFiniteActivationError, ValueError, FileNotFoundError, OSError)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except known as e:   # clear one-line errors for bad input; programming errors keep their traceback
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        print(f"morphoquant: error: {_output_fault_message(e, args) or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

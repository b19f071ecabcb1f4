"""Write a quantized model as a Hugging Face-style directory (see ``docs/serving.md``).

::

    out/
      config.json               the model config + quantization_config (compressed-tensors, or quant_method
                                "morphoquant" when a module needs the MorphoQuant extension)
      model.safetensors         packed int4 weights (two values a byte), scales, zero points, extension tensors,
                                and the non-quantized tensors (embeddings, norms, lm_head ...) in fp32/fp16/bf16
                                (model-0000i-of-0000n.safetensors + model.safetensors.index.json when sharded).
                                Named morphoquant-model*.safetensors when a module needs the MorphoQuant extension,
                                so that transformers refuses it instead of loading random weights
      generation_config.json    when the model has one
      recipe.yaml               the recipe
      tokenizer files ...       when ``tokenizer=`` (anything with ``save_pretrained``) or ``extra_files=`` is given
      morphoquant.json          the manifest, written last: every file's size and sha256, every tensor's
                                name/shape/dtype/sha256, every quantized module, versions, recipe, calibration

The directory is assembled in a temporary sibling and renamed into place (``utils.atomic.atomic_directory``).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..layers import QuantLinear
from ..utils.atomic import atomic_directory, fsync_file
from .compressed_tensors_format import EXT, build_quantization_config, encode_module, module_record
from .errors import UnsupportedExportError
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, environment_versions, safe_relative_name, utc_now
from .tensor_io import DTYPE_TO_ST, sha256_file, sha256_tensor, tensor_nbytes, write_safetensors

__all__ = ["SaveReport", "save_quantized"]

_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DEFAULT_SHARD = 4 * 1024 ** 3


@dataclass
class SaveReport:
    """What was written and how big it is. ``bytes_per_param`` and ``ratio_vs_fp16`` use the safetensors bytes
    (all tensors, headers included) over the parameter count of the unquantized model."""

    directory: str
    serving: str
    files: dict[str, int] = field(default_factory=dict)
    checkpoint_bytes: int = 0
    directory_bytes: int = 0
    n_params: int = 0
    quantized_params: int = 0
    quantized_modules: int = 0
    fp16_bytes: int = 0
    bytes_per_param: float = 0.0
    ratio_vs_fp16: float = 0.0
    quantized_bits_per_weight: float = 0.0
    breakdown: dict[str, int] = field(default_factory=dict)
    nonstandard: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        mib = 1024 ** 2
        lines = [f"saved {self.directory} ({self.serving} checkpoint)",
                 (f"  parameters        {self.n_params:,} ({self.quantized_params:,} quantized in "
                  f"{self.quantized_modules} linears)"),
                 (f"  safetensors       {self.checkpoint_bytes / mib:.2f} MiB = {self.bytes_per_param:.3f} "
                  f"bytes/param ({self.ratio_vs_fp16:.3f}x the fp16 checkpoint of {self.fp16_bytes / mib:.2f} MiB)"),
                 f"  quantized weights {self.quantized_bits_per_weight:.3f} bits/weight incl. scales"]
        for k, v in self.breakdown.items():
            lines.append(f"    {k:<24}{v / mib:10.3f} MiB")
        if self.nonstandard:
            first = next(iter(self.nonstandard.items()))
            lines.append(f"  {len(self.nonstandard)} module(s) need the MorphoQuant runtime, e.g. {first[0]}: "
                         f"{'; '.join(first[1])}")
        return "\n".join(lines)


def _recipe_yaml(recipe) -> tuple[str | None, str | None]:
    if recipe is None:
        return None, None
    from ..pipeline.recipe import Recipe, load_recipe, parse_recipe

    if isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return recipe.to_yaml(), recipe.fingerprint()


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _category(name: str, quant_names: set[str]) -> str:
    mod, _, leaf = name.rpartition(".")
    if mod.endswith("." + EXT):
        owner = mod[: -len(EXT) - 1]
        if owner in quant_names:
            if leaf == "weight_codes":
                return "quantized_weights"
            if leaf == "weight_scale":
                return "quantization_params"
            return "morphoquant_extension"
    if mod in quant_names:
        if leaf in ("weight_packed", "weight"):
            return "quantized_weights"
        if leaf == "bias":
            return "quantized_linear_bias"
        return "quantization_params"
    return "float_tensors"


def _json_ok(obj, what: str):
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serializable: {e}") from None


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, recipe=None, calibration_manifest: dict | None = None,
                   extra: dict | None = None, *, tokenizer=None, extra_files: list | tuple = (),
                   float_dtype: str | torch.dtype | None = None, overwrite: bool = False,
                   max_shard_bytes: int = _DEFAULT_SHARD, verbose: bool = True) -> SaveReport:
    """Write ``model`` (whose linears were replaced by ``QuantLinear``) to ``out_dir``.

    Args:
        recipe: the :class:`~morphoquant.pipeline.recipe.Recipe` (or a built-in name / YAML path / dict) used.
        calibration_manifest: JSON description of the calibration data (sources, counts, hashes).
        extra: any other JSON to keep in the manifest (e.g. the quantization report).
        tokenizer: an object with ``save_pretrained(dir)`` (tokenizer or processor) saved alongside.
        extra_files: paths copied into the directory (e.g. chat templates).
        float_dtype: dtype of the non-quantized floating tensors on disk (``"float16"`` ...); default: as in
            the model. Quantized-layer scales, zero points and biases are always fp32.
        overwrite: replace an existing ``out_dir`` (atomically) instead of refusing.
        max_shard_bytes: split the tensors over several files above this size.
    """
    out_dir = Path(out_dir)
    if isinstance(float_dtype, str):
        if float_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"float_dtype must be one of {sorted(_FLOAT_DTYPES)}, got {float_dtype!r}")
        float_dtype = _FLOAT_DTYPES[float_dtype]
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quant:
        raise ValueError("the model has no QuantLinear modules: quantize it first (morphoquant.quantize)")
    if (getattr(model, "morphoquant_rotation", None) or {}).get("layernorm_to_rmsnorm"):
        raise UnsupportedExportError(
            "this model was rotated for QuaRot/MQuant by turning its LayerNorms into RMSNorms and mapping the "
            "encoder's input stream (Whisper): config.json cannot describe that structure, so the checkpoint would "
            "not reload as evaluated. Export supports rotated Llama/Qwen2-style decoders; for this model export a "
            "recipe without rotation (e.g. rtn-w4a4, gptq-w4a4, morpho) or set options.rotate: never for mquant")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ValueError("save_quantized needs a transformers model (with a .config) to rebuild it on load")
    calibration = _json_ok(calibration_manifest or {}, "calibration_manifest")
    extra = _json_ok(extra or {}, "extra")
    recipe_yaml, recipe_fp = _recipe_yaml(recipe)

    # ---- quantized modules
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, dict] = {}
    for name, q in quant.items():
        records[name] = module_record(q)
        enc = encode_module(name, q)
        records[name]["tensors"] = sorted(enc)
        tensors.update(enc)

    # ---- everything else in the state dict (deduplicating tied tensors)
    quant_prefixes = tuple(n + "." for n in quant)
    seen: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    float_params: list[str] = []
    model_dtype = None
    for p in model.parameters():
        if p.is_floating_point():
            model_dtype = p.dtype
            break
    for key, t in model.state_dict(keep_vars=False).items():
        if key.startswith(quant_prefixes):
            continue
        sk = _storage_key(t)
        if sk in seen:
            tied[key] = seen[sk]
            continue
        seen[sk] = key
        if key in tensors:
            raise ValueError(f"state-dict entry {key!r} collides with a quantized-module tensor name")
        if t.dtype not in DTYPE_TO_ST:
            raise TypeError(f"state-dict entry {key!r} has dtype {t.dtype}, which cannot be stored")
        if float_dtype is not None and t.is_floating_point():
            t = t.to(float_dtype)
        tensors[key] = t.detach().cpu().contiguous()
        float_params.append(key)
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))

    # ---- sizes
    n_params = sum(p.numel() for p in model.parameters())
    n_params += sum(q.in_features * q.out_features + (q.out_features if q.bias is not None else 0)
                    for q in quant.values())
    qparams = sum(q.in_features * q.out_features for q in quant.values())
    breakdown: dict[str, int] = {}
    for name, t in tensors.items():
        c = _category(name, set(quant))
        breakdown[c] = breakdown.get(c, 0) + tensor_nbytes(t)

    # ---- shards
    names = sorted(tensors)
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        b = tensor_nbytes(tensors[n])
        if shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    serving = "compressed-tensors" if all(r["standard"] for r in records.values()) else "morphoquant"
    # A checkpoint that needs the MorphoQuant extension does not use transformers' file names: transformers
    # ignores an unknown quant_method and would load it with randomly initialised linears; this way it fails.
    stem = "model" if serving == "compressed-tensors" else "morphoquant-model"
    if len(shards) == 1:
        shard_files = [f"{stem}.safetensors"]
    else:
        shard_files = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    qconfig = build_quantization_config(records, ignore, format_version=FORMAT_VERSION)
    extra_files = [Path(f) for f in extra_files]

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        # config.json (+ generation config): the transformers writer, then our quantization_config
        config.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["architectures"] = [type(model).__name__]
        cfg["quantization_config"] = qconfig
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for f in extra_files:
            dest = tmp / f.name
            if dest.exists():
                raise FileExistsError(f"extra file {f} would overwrite {dest.name}")
            shutil.copy2(f, dest)
        if recipe_yaml is not None:
            (tmp / "recipe.yaml").write_text(recipe_yaml)
        tensor_entries: dict[str, dict] = {}
        weight_map: dict[str, str] = {}
        for fname, shard in zip(shard_files, shards):
            part = {n: tensors[n] for n in shard}
            write_safetensors(part, tmp / fname, metadata={"format": "pt",
                                                           "morphoquant_format_version": str(FORMAT_VERSION)})
            for n in shard:
                t = part[n]
                tensor_entries[n] = {"file": fname, "dtype": DTYPE_TO_ST[t.dtype], "shape": list(t.shape),
                                     "sha256": sha256_tensor(t)}
                weight_map[n] = fname
        if len(shard_files) > 1:
            total = sum(tensor_nbytes(t) for t in tensors.values())
            (tmp / f"{stem}.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        files: dict[str, dict] = {}
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                rel = path.relative_to(tmp).as_posix()
                if not safe_relative_name(rel):
                    raise ValueError(f"cannot list file {rel!r} in the manifest")
                files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        ckpt_bytes = sum(files[f]["size"] for f in shard_files)
        report = SaveReport(
            directory=str(out_dir), serving=serving, files={k: v["size"] for k, v in files.items()},
            checkpoint_bytes=ckpt_bytes, directory_bytes=sum(v["size"] for v in files.values()),
            n_params=n_params, quantized_params=qparams, quantized_modules=len(quant), fp16_bytes=2 * n_params,
            bytes_per_param=ckpt_bytes / max(n_params, 1), ratio_vs_fp16=ckpt_bytes / max(2 * n_params, 1),
            quantized_bits_per_weight=8 * (breakdown.get("quantized_weights", 0)
                                           + breakdown.get("quantization_params", 0)) / max(qparams, 1),
            breakdown=dict(sorted(breakdown.items())),
            nonstandard={n: r["nonstandard_reasons"] for n, r in records.items() if not r["standard"]})
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "created": utc_now(),
            "versions": environment_versions(),
            "architecture": {"model_class": type(model).__name__, "model_module": type(model).__module__,
                             "config_class": type(config).__name__,
                             "model_type": getattr(config, "model_type", None),
                             "attn_implementation": getattr(config, "_attn_implementation", None)},
            "serving": serving,
            "model_dtype": str(model_dtype).removeprefix("torch.") if model_dtype is not None else None,
            "float_dtype": str(float_dtype).removeprefix("torch.") if float_dtype is not None else None,
            "files": files, "tensors": tensor_entries, "tied": tied, "modules": records,
            "float_params": float_params,
            "recipe": {"yaml": recipe_yaml, "fingerprint": recipe_fp},
            "calibration": calibration, "extra": extra,
            "size_report": {k: v for k, v in report.to_dict().items() if k != "directory"},
        }
        mpath = tmp / MANIFEST_NAME
        mpath.write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n")   # last
        fsync_file(mpath)
    if verbose:
        print(report)
    return report

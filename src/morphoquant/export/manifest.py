"""``morphoquant.json``: the manifest of a checkpoint directory, written last (its presence marks the directory
complete).

Top-level keys::

    format            "morphoquant-checkpoint"
    format_version    integer; a reader accepts versions <= its own (FORMAT_VERSION)
    created           UTC ISO time
    versions          morphoquant, torch, transformers, safetensors, compressed-tensors, python
    architecture      {"model_class", "config_class", "model_type", "attn_implementation"}
    serving           "compressed-tensors" (every module standard) or "morphoquant" (needs the MorphoQuant runtime)
    model_dtype       dtype of the model's floating parameters when saved
    float_dtype       dtype the non-quantized floating tensors were written in
    files             {file name: {"size", "sha256"}} for every file of the directory except the manifest
    tensors           {tensor name: {"file", "dtype", "shape", "sha256"}} for every tensor written
    tied              {alias state-dict key: canonical key} (tensors stored once, e.g. lm_head ↔ embeddings)
    modules           {module name: record} for every QuantLinear (see compressed_tensors_format.module_record)
    float_params      names of the non-quantized state-dict entries written
    recipe            the recipe YAML (string) and its fingerprint
    calibration       the calibration manifest given by the caller (JSON)
    extra             caller-provided JSON
    size_report       the numbers of SaveReport
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path

from .errors import CorruptCheckpointError, IncompatibleCheckpointError, NotAMorphoQuantCheckpointError

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "environment_versions", "read_manifest", "safe_relative_name",
           "utc_now"]

FORMAT = "morphoquant-checkpoint"
FORMAT_VERSION = 1
MANIFEST_NAME = "morphoquant.json"
_DTYPES = ("float32", "float16", "bfloat16", "float64")


def utc_now() -> str:
    """Creation time; ``SOURCE_DATE_EPOCH`` (the reproducible-builds convention) pins it, so that the same
    inputs give a byte-identical checkpoint."""
    import os
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch else _dt.datetime.now(_dt.timezone.utc)
    return t.isoformat(timespec="seconds")


def environment_versions() -> dict[str, str]:
    import compressed_tensors
    import safetensors
    import torch
    import transformers

    from .. import __version__
    return {"morphoquant": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "compressed_tensors": compressed_tensors.__version__,
            "python": platform.python_version()}


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise CorruptCheckpointError(f"{MANIFEST_NAME}: {msg}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def safe_relative_name(name: str) -> bool:
    """A relative POSIX path inside the directory (no absolute paths, no ``..``, no backslashes)."""
    parts = name.split("/")
    return (bool(name) and not name.startswith("/") and "\\" not in name and "\x00" not in name
            and all(p not in ("", ".", "..") for p in parts))


def read_manifest(directory: str | Path) -> dict:
    """Read and structurally validate the manifest of ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotAMorphoQuantCheckpointError(f"{directory} is not a directory")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        others = sorted(p.name for p in directory.iterdir())[:8]
        raise NotAMorphoQuantCheckpointError(
            f"{directory} has no {MANIFEST_NAME}: it was not written by morphoquant.export.save_quantized (or its "
            f"write did not finish). Found: {others}. A compressed-tensors checkpoint from another tool loads with "
            "transformers/vLLM directly.")
    try:
        m = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({e})") from None
    _require(isinstance(m, dict), "not a JSON object")
    _require(m.get("format") == FORMAT, f"format is {m.get('format')!r}, expected {FORMAT!r}")
    fv = m.get("format_version")
    _require(_is_int(fv), f"format_version must be an integer, got {fv!r}")
    if fv > FORMAT_VERSION or fv < 1:
        saved = m.get("versions", {}).get("morphoquant") if isinstance(m.get("versions"), dict) else None
        raise IncompatibleCheckpointError(
            f"{directory}: checkpoint format version {fv} (written by morphoquant {saved}) is not supported by "
            f"this installation (reads versions 1..{FORMAT_VERSION}); upgrade morphoquant")
    for key, typ in (("files", dict), ("tensors", dict), ("modules", dict), ("tied", dict),
                     ("architecture", dict), ("versions", dict), ("float_params", list)):
        _require(isinstance(m.get(key), typ), f"{key!r} must be a JSON {typ.__name__}")
    for name, f in m["files"].items():
        _require(isinstance(name, str) and safe_relative_name(name), f"bad file name {name!r}")
        _require(isinstance(f, dict) and _is_int(f.get("size")) and isinstance(f.get("sha256"), str),
                 f"file entry {name!r} needs an integer size and a sha256 string")
    for name, t in m["tensors"].items():
        _require(isinstance(t, dict) and isinstance(t.get("file"), str) and t["file"] in m["files"]
                 and isinstance(t.get("dtype"), str) and isinstance(t.get("shape"), list)
                 and all(_is_int(d) and d >= 0 for d in t["shape"]) and isinstance(t.get("sha256"), str),
                 f"tensor entry {name!r} is malformed (needs file, dtype, shape, sha256)")
    for name, rec in m["modules"].items():
        _require(isinstance(rec, dict) and _is_int(rec.get("in_features")) and _is_int(rec.get("out_features"))
                 and rec["in_features"] > 0 and rec["out_features"] > 0 and isinstance(rec.get("bias"), bool)
                 and isinstance(rec.get("weights"), dict) and isinstance(rec.get("standard"), bool)
                 and (rec.get("input_activations") is None or isinstance(rec["input_activations"], dict))
                 and rec.get("dabc") in ("none", "dense", "sparse") and _is_int(rec.get("outliers", 0)),
                 f"module entry {name!r} is malformed")
        w, a = rec["weights"], rec.get("input_activations")
        _require(_is_int(w.get("num_bits")) and isinstance(w.get("type"), str)
                 and isinstance(w.get("symmetric"), bool) and isinstance(w.get("strategy"), str)
                 and (w.get("group_size") is None or _is_int(w["group_size"]))
                 and isinstance(rec.get("format"), str), f"module entry {name!r} has malformed weights")
        _require(a is None or (_is_int(a.get("num_bits")) and isinstance(a.get("symmetric"), bool)
                               and isinstance(a.get("strategy"), str) and isinstance(a.get("dynamic"), bool)),
                 f"module entry {name!r} has malformed input_activations")
    for key in ("model_dtype", "float_dtype"):
        _require(m.get(key) is None or m[key] in _DTYPES, f"{key} must be one of {_DTYPES} or null")
    _require(m.get("serving") in ("compressed-tensors", "morphoquant"), "serving must be compressed-tensors or "
             "morphoquant")
    for a, c in m["tied"].items():
        _require(isinstance(a, str) and isinstance(c, str), "tied must map strings to strings")
    _require(all(isinstance(n, str) for n in m["float_params"]), "float_params must be a list of strings")
    arch = m["architecture"]
    _require(isinstance(arch.get("model_class"), str) and isinstance(arch.get("config_class"), str)
             and (arch.get("attn_implementation") is None or isinstance(arch["attn_implementation"], str)),
             "architecture needs model_class and config_class strings")
    return m

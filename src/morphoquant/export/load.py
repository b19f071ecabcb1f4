"""Load a directory written by :func:`~morphoquant.export.save.save_quantized` — and refuse anything doubtful.

Checks, in order (each failure raises a :class:`~morphoquant.export.errors.CheckpointError` subclass naming the
file / tensor / module):

1. the manifest exists (else: a directory from another tool, or an unfinished write), parses, and has a
   supported ``format_version``;
2. every file it lists exists with the recorded size (truncation) and sha256 (tampering; ``verify="full"``);
   no unlisted ``*.safetensors`` file sits beside them;
3. ``config.json`` names the manifest's architecture, and its ``quantization_config`` gives every module the
   scheme the manifest and the tensors have;
4. every safetensors file parses strictly, holds exactly the tensors the manifest lists, with the recorded
   dtype, shape and per-tensor sha256;
5. the model (rebuilt from ``config.json`` with ``from_config``, or the one passed in) has a ``nn.Linear`` of
   the recorded shape at every quantized module name;
6. **every tensor written is consumed**: each is either decoded into a ``QuantLinear`` or loaded into a state-
   dict slot of the model, and every slot of the model is filled — a tensor with no slot (the silent-drop trap
   of transformers and vLLM) is an error, not a warning.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .compressed_tensors_format import check_quantization_config, decode_module
from .errors import (
    ArchitectureMismatchError,
    CheckpointError,
    ConfigMismatchError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    MissingTensorError,
    UnconsumedTensorError,
)
from .manifest import MANIFEST_NAME, read_manifest
from .tensor_io import ST_TO_DTYPE, read_safetensors, sha256_file

__all__ = ["load_quantized", "verify_checkpoint"]


def _fmt(names, n: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" ... (+{len(names) - n} more)" if len(names) > n else "")


def verify_checkpoint(directory: str | os.PathLike, *, verify: str = "full") -> tuple[dict, dict, dict]:
    """Run checks 1–4 and return ``(manifest, config_dict, tensors)`` without building a model."""
    if verify not in ("full", "size"):
        raise ValueError("verify must be 'full' (sizes and sha256) or 'size'")
    directory = Path(directory)
    m = read_manifest(directory)
    # 2. files
    for name, f in m["files"].items():
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{directory}: file {name} listed in the manifest is missing")
        size = path.stat().st_size
        if size != f["size"]:
            raise CorruptCheckpointError(
                f"{path}: {size} bytes but the manifest records {f['size']} "
                f"({'truncated' if size < f['size'] else 'modified'})")
        if verify == "full" and sha256_file(path) != f["sha256"]:
            raise CorruptCheckpointError(f"{path}: sha256 differs from the manifest (the file was modified)")
    stray = sorted(p.name for p in directory.glob("*.safetensors") if p.name not in m["files"])
    if stray:
        raise CorruptCheckpointError(f"{directory}: safetensors file(s) not listed in the manifest: {stray}")
    # 3. config.json
    if "config.json" not in m["files"]:
        raise CorruptCheckpointError(f"{directory}: the manifest lists no config.json")
    try:
        cfg = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{directory}/config.json: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CorruptCheckpointError(f"{directory}/config.json: not a JSON object")
    arch = m["architecture"]["model_class"]
    if arch not in (cfg.get("architectures") or []):
        raise ArchitectureMismatchError(f"{directory}: config.json names architectures "
                                        f"{cfg.get('architectures')} but the checkpoint was written from {arch}")
    check_quantization_config(cfg.get("quantization_config"), m["modules"])
    # 4. tensors
    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[str, set[str]] = {}
    for tname, t in m["tensors"].items():
        by_file.setdefault(t["file"], set()).add(tname)
    for fname in sorted(f for f in m["files"] if f.endswith(".safetensors")):
        loaded, _, shas = read_safetensors(directory / fname, with_sha256=verify == "full")
        want = by_file.get(fname, set())
        if set(loaded) != want:
            extra, missing = set(loaded) - want, want - set(loaded)
            raise CorruptCheckpointError(
                f"{directory / fname}: tensors differ from the manifest"
                + (f"; not in the manifest: {_fmt(extra)}" if extra else "")
                + (f"; missing: {_fmt(missing)}" if missing else ""))
        for tname, t in loaded.items():
            e = m["tensors"][tname]
            if ST_TO_DTYPE.get(e["dtype"]) != t.dtype or list(t.shape) != e["shape"]:
                raise CorruptCheckpointError(f"{directory / fname}: tensor {tname} is {t.dtype}{list(t.shape)}, the "
                                             f"manifest records {e['dtype']}{e['shape']}")
            if verify == "full" and shas[tname] != e["sha256"]:
                raise CorruptCheckpointError(f"{directory / fname}: tensor {tname} sha256 differs from the "
                                             "manifest (tampered)")
        tensors.update(loaded)
    missing_files = set(by_file) - {f for f in m["files"] if f.endswith(".safetensors")}
    if missing_files:
        raise CorruptCheckpointError(f"{directory}: the manifest places tensors in unlisted files {missing_files}")
    return m, cfg, tensors


def _build_model(m: dict, cfg: dict, model_class) -> nn.Module:
    import transformers

    arch = m["architecture"]
    cls = model_class or getattr(transformers, arch["model_class"], None)
    if cls is None:
        raise IncompatibleCheckpointError(
            f"transformers {transformers.__version__} has no class {arch['model_class']}; pass model_class= or "
            "model= to load_quantized")
    config_cls = getattr(transformers, arch["config_class"], None) or getattr(cls, "config_class", None)
    if config_cls is None:
        raise IncompatibleCheckpointError(f"cannot find the config class {arch['config_class']}")
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    dtype = getattr(torch, m.get("model_dtype") or "float32", None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"{MANIFEST_NAME}: unknown model_dtype {m.get('model_dtype')!r}")
    try:
        config = config_cls.from_dict(cfg)
        kwargs = {"dtype": dtype}
        if arch.get("attn_implementation"):
            kwargs["attn_implementation"] = arch["attn_implementation"]
        # skip the random initialisation: every parameter is overwritten from the checkpoint (checked below), and
        # the never-written fp32 weights of the linears about to be replaced are never paged in
        from transformers.initialization import no_init_weights

        with no_init_weights():
            model = cls._from_config(config, **kwargs) if hasattr(cls, "_from_config") else cls(config)
    except CheckpointError:
        raise
    except Exception as e:
        raise IncompatibleCheckpointError(
            f"cannot rebuild {arch['model_class']} from config.json with transformers {transformers.__version__} "
            f"(saved with {m['versions'].get('transformers')}): {type(e).__name__}: {e}") from e
    return model


def load_quantized(directory: str | os.PathLike, *, model: nn.Module | None = None, model_class=None,
                   verify: str = "full", runtime: str | None = None, kernel: str = "auto") -> nn.Module:
    """Rebuild the quantized model saved in ``directory`` (see the module docstring for the checks).

    Args:
        model: load into this (unquantized, same-architecture) model instead of building one from config.json.
        model_class: the class to build when transformers does not export ``architectures[0]``.
        verify: ``"full"`` (sizes + sha256 of every file and tensor) or ``"size"`` (sizes and structure only).
        runtime: ``None`` keeps ``QuantLinear`` (the fake-quant reference path); ``"integer"`` converts with
            :func:`morphoquant.runtime.to_integer_runtime` using ``kernel`` (``auto``, ``auto-fast``, ``fbgemm``,
            ``onednn``, ``int_mm``).
    Returns the model in eval mode; its manifest is at ``model.morphoquant_manifest``.
    """
    if runtime not in (None, "integer"):
        raise ValueError("runtime must be None or 'integer'")
    directory = Path(directory)
    m, cfg, tensors = verify_checkpoint(directory, verify=verify)
    arch = m["architecture"]["model_class"]
    if model is None:
        model = _build_model(m, cfg, model_class)
    elif type(model).__name__ != arch:
        raise ArchitectureMismatchError(f"cannot load a {arch} checkpoint into a {type(model).__name__}")
    model_dtype = getattr(torch, m.get("model_dtype") or "float32", None)
    if isinstance(model_dtype, torch.dtype):
        model.to(model_dtype)

    kern = None
    if runtime == "integer":
        from ..runtime import IntegerLinear, get_kernel, integer_runtime_support
        kern = get_kernel(kernel)

    def take(key: str) -> torch.Tensor | None:
        return tensors.pop(key, None)       # popped: consumed, and each buffer is released once decoded

    # 5. quantized modules
    for name, rec in m["modules"].items():
        try:
            sub = model.get_submodule(name)
        except AttributeError:
            raise ArchitectureMismatchError(f"the {type(model).__name__} has no module {name!r} (the checkpoint "
                                            "was written from a different architecture or size)") from None
        if not isinstance(sub, nn.Linear):
            raise ArchitectureMismatchError(f"module {name!r} is a {type(sub).__name__}, expected nn.Linear")
        if (sub.in_features, sub.out_features) != (rec["in_features"], rec["out_features"]):
            raise ArchitectureMismatchError(
                f"module {name!r} is Linear({sub.in_features}, {sub.out_features}) in the model but "
                f"Linear({rec['in_features']}, {rec['out_features']}) in the checkpoint")
        if (sub.bias is not None) != rec["bias"]:
            raise ArchitectureMismatchError(f"module {name!r}: bias {'present' if sub.bias is not None else 'absent'}"
                                            f" in the model but {'present' if rec['bias'] else 'absent'} in the "
                                            "checkpoint")
        try:
            q = decode_module(name, rec, take)
        except CheckpointError:
            raise
        except (ValueError, RuntimeError) as e:
            raise ConfigMismatchError(f"module {name}: {e}") from None
        if kern is not None and integer_runtime_support(q) is None:
            q = IntegerLinear(q, kern)         # convert as we go: never all int8 codes and packings at once
        model.set_submodule(name, q)

    # 6. everything else: load into the state dict and account for every slot and every tensor
    quant_prefixes = tuple(n + "." for n in m["modules"])
    sd: dict[str, torch.Tensor] = {}
    for key in m["float_params"]:
        t = take(key)
        if t is None:
            raise MissingTensorError(f"tensor {key!r} listed in the manifest is missing")
        sd[key] = t
    for alias, canonical in m["tied"].items():
        if canonical not in sd:
            raise MissingTensorError(f"tied tensor {alias!r} refers to {canonical!r}, which was not written")
        sd[alias] = sd[canonical]
    unconsumed = set(tensors)
    if unconsumed:
        raise UnconsumedTensorError(f"{len(unconsumed)} tensor(s) in {directory} have no slot in the model and "
                                    f"would be silently dropped: {_fmt(unconsumed)}")
    model_keys = set(model.state_dict().keys())
    no_slot = set(sd) - model_keys
    if no_slot:
        raise UnconsumedTensorError(f"the {type(model).__name__} has no slot for {len(no_slot)} tensor(s) of the "
                                    f"checkpoint (they would be silently dropped): {_fmt(no_slot)}")
    unfilled = {k for k in model_keys - set(sd) if not k.startswith(quant_prefixes)}
    if unfilled:
        raise MissingTensorError(f"the checkpoint does not provide {len(unfilled)} tensor(s) the "
                                 f"{type(model).__name__} needs: {_fmt(unfilled)}")
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ArchitectureMismatchError(f"tensor shapes do not fit the {type(model).__name__}: {e}") from None
    if m["tied"] and hasattr(model, "tie_weights"):
        model.tie_weights()           # re-tie (skipped with the initialisation); values are equal either way
    current = model.state_dict()
    for k, t in sd.items():          # paranoid: each value really landed (no hook renamed or dropped it)
        if not torch.equal(current[k], t.to(current[k].dtype)):
            raise UnconsumedTensorError(f"tensor {k!r} did not land in the model after loading")
    gen_path = directory / "generation_config.json"
    if "generation_config.json" in m["files"] and gen_path.is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(directory))
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(f"{gen_path}: {e}") from None
    model.eval()
    model.morphoquant_manifest = m
    _attach_modality_context(model)
    del sd, current                   # release the file buffers before the runtime packs its own copies
    return model


def _attach_modality_context(model: nn.Module) -> None:
    """Per-modality quantizers need the token modalities: let the model's adapter supply them on every forward."""
    from ..layers.quant_linear import has_modality_quantizers
    if not has_modality_quantizers(model):
        return
    from ..models import get_adapter
    get_adapter(model).attach_modality_context()

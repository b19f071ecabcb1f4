"""The loader refuses every doubtful checkpoint with a clear CheckpointError (never a crash, never a silent drop)."""
from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from morphoquant.export import (
    ArchitectureMismatchError,
    CheckpointError,
    ConfigMismatchError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    MissingTensorError,
    NotAMorphoQuantCheckpointError,
    UnconsumedTensorError,
    load_quantized,
)
from morphoquant.export.tensor_io import read_safetensors, sha256_file, sha256_tensor, write_safetensors


def _copy(src, tmp_path, name="ck"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _manifest(d):
    return json.loads((d / "morphoquant.json").read_text())


def _write_manifest(d, m):
    (d / "morphoquant.json").write_text(json.dumps(m))


def _refresh(d, *files):
    """Make the manifest's file-level size/sha256 agree with the files again (a consistent forgery)."""
    m = _manifest(d)
    for f in files:
        m["files"][f] = {"size": (d / f).stat().st_size, "sha256": sha256_file(d / f)}
    _write_manifest(d, m)
    return m


def _weights_file(d):
    return next(f for f in _manifest(d)["files"] if f.endswith(".safetensors"))


def _rewrite_tensors(d, edit):
    """Apply ``edit(tensors) -> tensors`` to the weights file and update the manifest consistently."""
    f = _weights_file(d)
    tensors, meta, _ = read_safetensors(d / f)
    tensors = edit(dict(tensors))
    write_safetensors(tensors, d / f, metadata=meta)
    m = _refresh(d, f)
    m["tensors"] = {n: {"file": f, "dtype": _st(t.dtype), "shape": list(t.shape),
                        "sha256": sha256_tensor(t)} for n, t in tensors.items()}
    _write_manifest(d, m)
    return m


def _st(dtype):
    from morphoquant.export.tensor_io import DTYPE_TO_ST
    return DTYPE_TO_ST[dtype]


# ------------------------------------------------------------------------------------------------ files

def test_truncated_safetensors(saved_dir, tmp_path):
    d = _copy(saved_dir("w4a4")[0], tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        load_quantized(d)
    _refresh(d, "model.safetensors")          # even with a manifest that agrees, the parser sees the truncation
    with pytest.raises(CorruptCheckpointError, match="truncated|short"):
        load_quantized(d)


def test_tampered_safetensors(saved_dir, tmp_path):
    d = _copy(saved_dir("w4a4")[0], tmp_path)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="sha256"):
        load_quantized(d)
    _refresh(d, "model.safetensors")          # file hash forged: the per-tensor hash still catches it
    with pytest.raises(CorruptCheckpointError, match="tensor .* sha256"):
        load_quantized(d)


def test_missing_file_and_stray_shard(saved_dir, tmp_path):
    d = _copy(saved_dir("w4a16")[0], tmp_path)
    shutil.copy(d / "model.safetensors", d / "model-extra.safetensors")
    with pytest.raises(CorruptCheckpointError, match="not listed"):
        load_quantized(d)
    (d / "model-extra.safetensors").unlink()
    (d / "recipe.yaml").unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        load_quantized(d)


def test_directory_from_another_tool(tmp_path):
    from morphoquant.models.tiny import tiny_model

    model, _ = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(NotAMorphoQuantCheckpointError, match="morphoquant.json"):
        load_quantized(tmp_path / "hf")
    with pytest.raises(NotAMorphoQuantCheckpointError):
        load_quantized(tmp_path / "does-not-exist")


def test_unsupported_format_version(saved_dir, tmp_path):
    d = _copy(saved_dir("w4a16")[0], tmp_path)
    m = _manifest(d)
    m["format_version"] = 99
    _write_manifest(d, m)
    with pytest.raises(IncompatibleCheckpointError, match="format version 99"):
        load_quantized(d)


# ------------------------------------------------------------------------------------------------ config

def test_config_disagreeing_with_tensors(saved_dir, tmp_path):
    d = _copy(saved_dir("w4a4")[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptCheckpointError, match="config.json"):          # the sha256 notices first
        load_quantized(d)
    _refresh(d, "config.json")
    with pytest.raises(ConfigMismatchError, match="group_size"):
        load_quantized(d)


def test_config_bits_disagree(saved_dir, tmp_path):
    d = _copy(saved_dir("morpho-dense")[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]["num_bits"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    _refresh(d, "config.json")
    with pytest.raises(ConfigMismatchError, match="num_bits"):
        load_quantized(d)


def test_manifest_and_config_agree_but_tensors_do_not(saved_dir, tmp_path):
    d = _copy(saved_dir("w4a4")[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    m = _refresh(d, "config.json")
    for rec in m["modules"].values():
        rec["weights"]["group_size"] = 16
    _write_manifest(d, m)
    with pytest.raises(ConfigMismatchError, match="weight_scale"):
        load_quantized(d)


def test_quant_method_must_match(saved_dir, tmp_path):
    d = _copy(saved_dir("morpho-dense")[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "compressed-tensors"   # would let vLLM load it without DABC
    (d / "config.json").write_text(json.dumps(cfg))
    _refresh(d, "config.json")
    with pytest.raises(ConfigMismatchError, match="quant_method"):
        load_quantized(d)


# ------------------------------------------------------------------------------------------------ architecture

def test_load_into_another_architecture(saved_dir, tmp_path):
    from morphoquant.models.tiny import tiny_model

    path = saved_dir("w4a4")[0]
    with pytest.raises(ArchitectureMismatchError, match="LlamaForCausalLM checkpoint into a Qwen2ForCausalLM"):
        load_quantized(path, model=tiny_model("qwen2")[0])
    d = _copy(path, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    _refresh(d, "config.json")
    with pytest.raises(ArchitectureMismatchError, match="Qwen2ForCausalLM"):
        load_quantized(d)


def test_load_into_a_model_of_another_size(saved_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ArchitectureMismatchError, match="Linear"):
        load_quantized(saved_dir("w4a4")[0], model=small)


# ------------------------------------------------------------------------------------------------ tensors

def test_missing_extension_tensor(saved_dir, tmp_path):
    d = _copy(saved_dir("morpho-dense")[0], tmp_path)
    key = "model.layers.1.self_attn.o_proj.morphoquant.outlier_idx"

    def drop(t):
        del t[key]
        return t
    _rewrite_tensors(d, drop)
    with pytest.raises(MissingTensorError, match="outlier_idx"):
        load_quantized(d)


def test_unconsumed_tensor_is_an_error(saved_dir, tmp_path):
    """The anchors.md trap: o_proj / MLP linears have no bias slot; a bias written there must not vanish."""
    d = _copy(saved_dir("w4a4")[0], tmp_path)
    key = "model.layers.0.self_attn.o_proj.bias"

    def add(t):
        t[key] = torch.ones(64)
        return t
    _rewrite_tensors(d, add)
    with pytest.raises(UnconsumedTensorError, match="o_proj.bias"):
        load_quantized(d)


def test_tensor_without_model_slot(saved_dir, tmp_path):
    d = _copy(saved_dir("w4a16")[0], tmp_path)
    m = _rewrite_tensors(d, lambda t: t | {"model.layers.0.extra_norm.weight": torch.ones(64)})
    m["float_params"].append("model.layers.0.extra_norm.weight")
    _write_manifest(d, m)
    with pytest.raises(UnconsumedTensorError, match="extra_norm"):
        load_quantized(d)


def test_model_slot_without_tensor(saved_dir, tmp_path):
    d = _copy(saved_dir("w4a16")[0], tmp_path)
    key = "model.norm.weight"
    m = _rewrite_tensors(d, lambda t: {k: v for k, v in t.items() if k != key})
    m["float_params"].remove(key)
    _write_manifest(d, m)
    with pytest.raises(MissingTensorError, match="model.norm.weight"):
        load_quantized(d)


def test_manifest_dtype_disagrees_with_file(saved_dir, tmp_path):
    d = _copy(saved_dir("w4a16")[0], tmp_path)
    m = _manifest(d)
    m["tensors"]["model.norm.weight"]["dtype"] = "F16"
    _write_manifest(d, m)
    with pytest.raises(CorruptCheckpointError, match="model.norm.weight"):
        load_quantized(d)


# ------------------------------------------------------------------------------------------------ fuzz

def _valid_header(names=("a", "b")) -> bytes:
    header = {n: {"dtype": "F32", "shape": [2], "data_offsets": [8 * i, 8 * i + 8]} for i, n in enumerate(names)}
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + bytes(8 * len(names))


_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


@_FUZZ
@given(data=st.one_of(st.binary(max_size=300),
                      st.builds(lambda h, cut, flips: bytes(b ^ (0xFF if i in flips else 0)
                                                          for i, b in enumerate(h[:cut])),
                                st.just(_valid_header()), st.integers(0, 120), st.sets(st.integers(0, 120))),
                      st.builds(lambda n, body: struct.pack("<Q", n) + body, st.integers(0, 2 ** 64 - 1),
                                st.binary(max_size=100))))
def test_fuzz_safetensors_bytes(saved_dir, tmp_path_factory, data):
    """Random bytes as model.safetensors, with a manifest that agrees on its size and hash."""
    d = tmp_path_factory.mktemp("fuzz") / "ck"
    shutil.copytree(saved_dir("w4a16")[0], d)
    (d / "model.safetensors").write_bytes(data)
    _refresh(d, "model.safetensors")
    with pytest.raises(CheckpointError):
        load_quantized(d)


def _json_values():
    return st.recursive(st.none() | st.booleans() | st.integers(-5, 10 ** 6) | st.text(max_size=8),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                        max_leaves=8)


@_FUZZ
@given(raw=st.one_of(st.binary(max_size=200), _json_values().map(lambda v: json.dumps(v).encode())),
       key=st.sampled_from(["format_version", "files", "tensors", "modules", "tied", "architecture", "float_params",
                            "model_dtype", "versions"]),
       value=_json_values(), mode=st.sampled_from(["raw", "mutate"]))
def test_fuzz_manifest(saved_dir, tmp_path_factory, raw, key, value, mode):
    """Random bytes or a randomly mutated manifest: always our error type."""
    d = tmp_path_factory.mktemp("fuzzm") / "ck"
    shutil.copytree(saved_dir("w4a16")[0], d)
    if mode == "raw":
        (d / "morphoquant.json").write_bytes(raw)
    else:
        m = _manifest(d)
        m[key] = value
        _write_manifest(d, m)
    try:
        load_quantized(d)
    except CheckpointError:
        pass
    else:                      # a mutation that changed nothing meaningful may load: then it must be correct
        assert mode == "mutate"

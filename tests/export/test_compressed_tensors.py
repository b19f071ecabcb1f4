"""The standard schemes are real compressed-tensors checkpoints: checked with the compressed-tensors library and by
loading them through transformers' compressed-tensors integration."""
from __future__ import annotations

import json

import pytest
import torch
from export_helpers import STANDARD

from morphoquant.export import read_manifest
from morphoquant.export.tensor_io import read_safetensors
from morphoquant.layers import QuantLinear


@pytest.mark.parametrize("scheme", sorted(STANDARD))
def test_config_validates_with_compressed_tensors(scheme, saved_dir):
    from compressed_tensors.quantization import QuantizationConfig

    path, _, _ = saved_dir(scheme)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    parsed = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k not in (
        "version", "sparsity_config", "transform_config")})
    expect = "int-quantized" if scheme == "w8a8" else "pack-quantized"
    assert parsed.format == expect
    assert "lm_head" in parsed.ignore


@pytest.mark.parametrize("scheme", sorted(STANDARD))
def test_compressed_tensors_decompresses_our_weights(scheme, saved_dir):
    """The library's own decompressor turns our tensors into exactly our dequantized weights."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    path, model, _ = saved_dir(scheme)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    tensors, _, _ = read_safetensors(path / "model.safetensors")
    scheme_obj = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    comp = BaseCompressor.get_value_from_registry(qc["config_groups"]["group_0"]["format"])
    for name, q in model.named_modules():
        if not isinstance(q, QuantLinear):
            continue
        local = {k[len(name) + 1:]: v for k, v in tensors.items()
                 if k.startswith(name + ".") and ".morphoquant." not in k and not k.endswith(".bias")}
        if "input_scale" in local:
            local = {k: v for k, v in local.items() if not k.startswith("input_")}
        out = comp.decompress(local, scheme_obj)
        assert torch.equal(out["weight"].float(), q.dequantized_weight), name


def test_transformers_loads_w4a16_identically(saved_dir):
    """transformers + compressed-tensors read our W4A16 checkpoint and compute the same logits, bit for bit."""
    from transformers import AutoModelForCausalLM

    path, model, factory = saved_dir("w4a16")
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    sample = factory(seed=5)
    with torch.no_grad():
        assert torch.equal(hf(**sample).logits, model(**sample).logits)


def test_transformers_loads_w4a4_weights(saved_dir):
    """W4A4: same weights; the dynamic activation quantizer is the engine's (compressed-tensors' reference uses
    scale = amax / 7.5, MorphoQuant and vLLM's int8 kernel amax / (2^(b-1) - 1)) — see docs/serving.md."""
    from transformers import AutoModelForCausalLM

    path, model, _ = saved_dir("w4a4")
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    name = "model.layers.0.mlp.down_proj"
    sd = hf.state_dict()
    tensors, _, _ = read_safetensors(path / "model.safetensors")
    if name + ".weight" in sd:                               # decompressed on load
        assert torch.equal(sd[name + ".weight"].float(), model.get_submodule(name).dequantized_weight)
    else:                                                    # kept compressed ("run compressed")
        for leaf in ("weight_packed", "weight_scale"):
            assert torch.equal(sd[f"{name}.{leaf}"], tensors[f"{name}.{leaf}"])


def test_transformers_refuses_morphoquant_checkpoints(saved_dir):
    """A checkpoint that needs the extension must not load silently without it (unknown quant_method)."""
    from transformers import AutoModelForCausalLM

    path, _, _ = saved_dir("morpho-dense")
    assert read_manifest(path)["serving"] == "morphoquant"
    with pytest.raises(OSError, match="model.safetensors|no file named"):
        AutoModelForCausalLM.from_pretrained(path)

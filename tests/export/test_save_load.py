"""Save → load round trips: identical outputs, identical buffers, manifest contents, size report, generate."""
from __future__ import annotations

import json

import pytest
import torch
from export_helpers import SCHEMES, STANDARD, hand_quantize

from morphoquant.export import load, load_quantized, read_manifest, save_quantized
from morphoquant.layers import QuantLinear


def _logits(model, sample):
    with torch.no_grad():
        return model(**sample).logits


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_roundtrip_is_identical(scheme, saved_dir):
    path, model, factory = saved_dir(scheme)
    loaded = load_quantized(path)
    sample = factory(seed=7)
    assert torch.equal(_logits(model, sample), _logits(loaded, sample))
    orig = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    new = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert orig.keys() == new.keys() and orig
    for n, q in orig.items():
        r = new[n]
        assert (r.weight_spec, r.act, r.dabc) == (q.weight_spec, q.act, q.dabc)
        for k, t in q.state_dict().items():
            u = r.state_dict()[k]
            assert u.dtype == t.dtype and u.shape == t.shape and torch.equal(u, t), f"{n}.{k}"
    m = read_manifest(path)
    assert m["serving"] == ("compressed-tensors" if scheme in STANDARD else "morphoquant")


def test_size_only_verification_loads_the_same(saved_dir):
    path, model, factory = saved_dir("w4a4-static-tensor")
    sample = factory(seed=9)
    assert torch.equal(_logits(load_quantized(path, verify="size"), sample), _logits(model, sample))
    with pytest.raises(ValueError, match="verify"):
        load_quantized(path, verify="none")


def test_load_alias_and_activation_quantization_stays_active(saved_dir):
    path_a4, _, factory = saved_dir("w4a4")
    path_a16, _, _ = saved_dir("w4a16")
    m4, m16 = load(path_a4), load_quantized(path_a16)
    sample = factory(seed=3)
    # same weights (same seed, same weight spec), only the activation quantizer differs
    q4 = m4.get_submodule("model.layers.0.mlp.down_proj")
    q16 = m16.get_submodule("model.layers.0.mlp.down_proj")
    assert torch.equal(q4.weight_codes, q16.weight_codes) and q4.act is not None and q16.act is None
    assert not torch.allclose(_logits(m4, sample), _logits(m16, sample), atol=1e-4)


def test_generate_matches_in_memory_model(saved_dir):
    path, model, factory = saved_dir("morpho-dense")
    loaded = load_quantized(path)
    ids = factory(batch_size=1, pad=False)["input_ids"]
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        a = model.generate(ids, **kw)
        b = loaded.generate(ids, **kw)
    assert a.shape[1] == ids.shape[1] + 5 and torch.equal(a, b)


def test_manifest_lists_everything(saved_dir):
    path, _, _ = saved_dir("morpho-sparse")
    m = read_manifest(path)
    assert m["format_version"] == 1 and m["versions"]["torch"] == torch.__version__
    assert "rtn-w4a4" in m["recipe"]["yaml"] and m["calibration"] == {"source": "random", "n": 2}
    assert m["extra"] == {"scheme": "morpho-sparse"}
    assert {"config.json", "morphoquant-model.safetensors", "recipe.yaml"} <= set(m["files"])
    assert "model.safetensors" not in m["files"]              # transformers must not pick it up
    for t in m["tensors"].values():
        assert {"file", "dtype", "shape", "sha256"} <= set(t)
    dp = "model.layers.0.mlp.down_proj"
    for leaf in ("weight_packed", "weight_scale", "weight_shape", "morphoquant.act_scale", "morphoquant.act_zero",
                 "morphoquant.outlier_idx", "morphoquant.outlier_threshold"):
        assert f"{dp}.{leaf}" in m["tensors"], leaf
    rec = m["modules"][dp]
    assert rec["dabc"] == "sparse" and rec["outliers"] == 3 and not rec["standard"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "morphoquant"


def test_int4_is_packed_two_per_byte_and_size_report(saved_dir):
    path, model, _ = saved_dir("w4a4")
    m = read_manifest(path)
    t = m["tensors"]["model.layers.0.mlp.up_proj.weight_packed"]      # Linear(64 -> 128)
    assert t["dtype"] == "I32" and t["shape"] == [128, 64 * 4 // 32]      # 8 int4 a word = 2 a byte
    rep = m["size_report"]
    n_params = sum(p.numel() for p in model.parameters()) + sum(
        q.in_features * q.out_features for q in model.modules() if isinstance(q, QuantLinear))
    assert rep["n_params"] == n_params and rep["fp16_bytes"] == 2 * n_params
    assert rep["bytes_per_param"] == pytest.approx(rep["checkpoint_bytes"] / n_params)
    assert rep["ratio_vs_fp16"] == pytest.approx(rep["checkpoint_bytes"] / (2 * n_params))
    assert 5.0 <= rep["quantized_bits_per_weight"] < 5.1            # int4 + one fp32 scale per 32 weights
    assert rep["breakdown"]["quantized_weights"] * 2 == rep["quantized_params"]


def test_w8a8_is_int8_one_per_byte(saved_dir):
    path, _, _ = saved_dir("w8a8")
    t = read_manifest(path)["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert t["dtype"] == "I8" and t["shape"] == [128, 64]


def test_sharded_and_fp16_storage(tmp_path, quantized_llama):
    model, factory = quantized_llama("w4a4")
    rep = save_quantized(model, tmp_path / "m", max_shard_bytes=100_000, float_dtype="float16", verbose=False)
    shards = [f for f in rep.files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in rep.files
    m = read_manifest(tmp_path / "m")
    assert m["tensors"]["model.embed_tokens.weight"]["dtype"] == "F16"
    assert m["tensors"]["model.layers.0.mlp.up_proj.weight_scale"]["dtype"] == "F32"   # scales stay fp32
    loaded = load_quantized(tmp_path / "m")
    # identical to the in-memory model once its float tensors are rounded to fp16
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    sample = factory(seed=1)
    assert torch.equal(_logits(model, sample), _logits(loaded, sample))


def test_tied_embeddings_stay_tied(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    model.eval()
    hand_quantize(model, "w4a4")
    save_quantized(model, tmp_path / "m", verbose=False)
    m = read_manifest(tmp_path / "m")
    assert m["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in m["tensors"]
    loaded = load_quantized(tmp_path / "m")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_omni_thinker_roundtrip(tmp_path):
    from morphoquant.models.tiny import tiny_model

    model, factory = tiny_model("qwen2.5-omni-thinker")
    hand_quantize(model, "morpho-dense", only="model.layers")
    save_quantized(model, tmp_path / "omni", verbose=False)
    loaded = load_quantized(tmp_path / "omni")
    sample = factory(seed=2)
    with torch.no_grad():
        assert torch.equal(model(**sample).logits, loaded(**sample).logits)


def test_quantize_api_then_save_and_load(tmp_path):
    from morphoquant import quantize
    from morphoquant.models.tiny import tiny_model

    model, factory = tiny_model("qwen2")
    quantize(model, "rtn-w4a4-static", [factory(seed=0)], progress=False)
    rep = save_quantized(model, tmp_path / "q", "rtn-w4a4-static", {"samples": 1}, verbose=False)
    assert rep.serving == "morphoquant" and rep.nonstandard      # static per-channel activations
    loaded = load_quantized(tmp_path / "q")
    sample = factory(seed=4)
    with torch.no_grad():
        assert torch.equal(model(**sample).logits, loaded(**sample).logits)


def test_tokenizer_hook_and_extra_files(tmp_path, quantized_llama):
    class Tok:
        def save_pretrained(self, d):
            (tmp_path / "unused").mkdir(exist_ok=True)
            import pathlib
            (pathlib.Path(d) / "tokenizer.json").write_text("{}")

    extra = tmp_path / "chat_template.jinja"
    extra.write_text("{{ messages }}")
    model, _ = quantized_llama("w4a16")
    save_quantized(model, tmp_path / "m", tokenizer=Tok(), extra_files=[extra], verbose=False)
    files = read_manifest(tmp_path / "m")["files"]
    assert "tokenizer.json" in files and "chat_template.jinja" in files
    load_quantized(tmp_path / "m")


def test_save_refuses_existing_dir_and_unquantized_model(tmp_path, quantized_llama):
    from morphoquant.models.tiny import tiny_model

    model, _ = quantized_llama("w4a16")
    save_quantized(model, tmp_path / "m", verbose=False)
    with pytest.raises(FileExistsError):
        save_quantized(model, tmp_path / "m", verbose=False)
    save_quantized(model, tmp_path / "m", overwrite=True, verbose=False)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]           # no temporary leftovers
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized(tiny_model("llama")[0], tmp_path / "n", verbose=False)
    with pytest.raises(ValueError, match="JSON"):
        save_quantized(model, tmp_path / "o", calibration_manifest={"x": object()}, verbose=False)
    assert not (tmp_path / "o").exists() and not (tmp_path / "n").exists()


def test_report_prints(tmp_path, quantized_llama, capsys):
    model, _ = quantized_llama("morpho-dynamic-clip")
    rep = save_quantized(model, tmp_path / "m")
    out = capsys.readouterr().out
    assert "bytes/param" in out and "fp16" in out and "MorphoQuant runtime" in out
    assert rep.serving == "morphoquant"


def test_whisper_rotated_by_quarot_is_refused_with_a_clear_error(tmp_path):
    """Its LayerNorms became RMSNorms and its encoder input is mapped by a hook: config.json cannot describe
    that, so nothing is written (rather than a checkpoint that reloads as a different model)."""
    from morphoquant import quantize
    from morphoquant.export import UnsupportedExportError
    from morphoquant.models.tiny import tiny_model
    from morphoquant.pipeline.recipe import load_recipe

    model, factory = tiny_model("whisper")
    quantize(model, load_recipe("quarot-w4a4", {"weights": {"group_size": 16}}), [factory(seed=0)], progress=False)
    with pytest.raises(UnsupportedExportError, match="LayerNorms into RMSNorms"):
        save_quantized(model, tmp_path / "w", verbose=False)
    assert not (tmp_path / "w").exists()

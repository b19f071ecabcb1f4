import pytest
import torch
from torch import nn

from morphoquant.methods.quarot import (
    HadamardLinear,
    HadamardQuantLinear,
    UnsupportedRotationError,
    rotate_model,
    unrotate_hidden_states,
    unrotate_residual_stream,
)
from morphoquant.numerics.hadamard import hadamard_factor

W8, A8 = {"bits": 8, "granularity": "channel"}, {"bits": 8, "granularity": "token"}


def _check_rotation(model, sample, adapter, seed=1):
    mask = sample["attention_mask"].bool()
    with torch.no_grad():
        before = model(**sample, output_hidden_states=True)
    info = rotate_model(model, adapter.stacks(), seed=seed)
    with torch.no_grad():
        after = model(**sample, output_hidden_states=True)
    scale = float(before.logits.abs().max())
    assert torch.allclose(after.logits[mask], before.logits[mask], atol=2e-5 * scale, rtol=1e-4)
    h = unrotate_hidden_states(model, after.hidden_states[-1])
    assert torch.allclose(h[mask], before.hidden_states[-1][mask], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(after.hidden_states[-1][mask], before.hidden_states[-1][mask], atol=1e-3)
    for h_rot, h_fp in zip(after.hidden_states[1:-1], before.hidden_states[1:-1]):   # block outputs, un-normed
        h = unrotate_residual_stream(model, h_rot)
        assert torch.allclose(h[mask], h_fp[mask], atol=1e-4 * float(h_fp.abs().max()), rtol=1e-4)
    return info


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen2.5-omni-thinker"])
def test_rotation_leaves_the_fp_logits_unchanged(arch, perturb_norms):
    from morphoquant.models import get_adapter
    from morphoquant.models.tiny import tiny_model
    model, factory = tiny_model(arch)
    perturb_norms(model)
    info = _check_rotation(model, factory(seed=3), get_adapter(model))
    layer = model.model.layers[0] if arch != "qwen2.5-omni-thinker" else model.model.language_model.layers[0]
    assert isinstance(layer.mlp.down_proj, HadamardLinear)
    gamma = layer.input_layernorm.weight.detach()
    assert float(gamma.min()) == 1.0 == float(gamma.max())
    if arch == "qwen2.5-omni-thinker":       # image and audio features enter the rotated stream too
        assert set(info["towers"]) == {"model.audio_tower.proj", "model.visual.merger.mlp.2"}


@pytest.mark.parametrize("cls_name", ["Llama", "Qwen2"])
def test_rotation_with_non_power_of_two_widths_and_tied_embeddings(cls_name, perturb_norms):
    """hidden 48 = 4·12, intermediate 80 = 4·20, head_dim 12: Paley ⊗ Sylvester everywhere; tied embeddings
    are untied (E Q on the input side, diag(γ) on the lm_head side)."""
    import transformers

    from morphoquant.models import get_adapter
    cfg = getattr(transformers, f"{cls_name}Config")(
        vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = getattr(transformers, f"{cls_name}ForCausalLM")(cfg).eval()
    perturb_norms(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    sample = {"input_ids": torch.randint(3, 128, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    info = _check_rotation(model, sample, get_adapter(model))
    assert info["residual_hadamard"] == "paley" and info["online_down_proj"] == "paley"
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False


def test_hadamard_linear_is_the_same_function():
    torch.manual_seed(0)
    lin = nn.Linear(80, 12)
    had = HadamardLinear.wrap(lin, hadamard_factor(80))
    x = torch.randn(5, 80)
    with torch.no_grad():
        assert torch.allclose(had(x), lin(x), atol=1e-5)


def test_unsupported_architectures_are_refused():
    from morphoquant.models import get_adapter
    from morphoquant.models.tiny import tiny_model
    model, _ = tiny_model("dinov2")
    with pytest.raises(UnsupportedRotationError, match="Llama/Qwen2"):
        rotate_model(model, get_adapter(model).stacks())


def test_whisper_rotation_leaves_the_fp_outputs_unchanged(perturb_norms):
    """LayerNorms (γ, β perturbed) become RMSNorms on centred, rotated encoder and decoder streams; the logits,
    the encoder output seen by the decoder and the unrotated final decoder state are those of the FP model."""
    from morphoquant.models import get_adapter
    from morphoquant.models.tiny import tiny_model
    model, factory = tiny_model("whisper")
    perturb_norms(model)
    sample = factory(seed=3)
    with torch.no_grad():
        before = model(**sample, output_hidden_states=True)
    info = rotate_model(model, get_adapter(model).stacks(), seed=2)
    with torch.no_grad():
        after = model(**sample, output_hidden_states=True)
    mask = sample["decoder_attention_mask"].bool()
    scale = float(before.logits.abs().max())
    assert torch.allclose(after.logits[mask], before.logits[mask], atol=2e-5 * scale, rtol=1e-4)
    h = unrotate_hidden_states(model, after.decoder_hidden_states[-1])
    assert torch.allclose(h[mask], before.decoder_hidden_states[-1][mask], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="centred as well as rotated"):
        unrotate_residual_stream(model, after.decoder_hidden_states[1])
    # the streams really are rotated (not the identity) and every LayerNorm is gone
    assert not torch.allclose(after.encoder_hidden_states[1], before.encoder_hidden_states[1], atol=1e-3)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert sorted(info["stacks"]) == ["decoder", "encoder"]
    assert isinstance(model.model.decoder.layers[0].fc2, HadamardLinear)
    assert model.proj_out.weight is not model.model.decoder.embed_tokens.weight
    # the entrance map is applied inside the encoder's forward only: a direct call of block 0 is unchanged
    enc0 = model.model.encoder.layers[0]
    x = torch.randn(1, 5, enc0.self_attn.q_proj.in_features)
    with torch.no_grad():
        assert torch.equal(enc0(x, None), enc0(x, None))
        assert not enc0._forward_pre_hooks


def test_quarot_on_whisper_w8a8_is_close_to_fp_and_w4a4_beats_rtn(run_recipe, perturb_norms):
    w4, a4 = {"bits": 4, "granularity": "group", "group_size": 16}, {"bits": 4, "granularity": "token"}
    err8, report, model = run_recipe("whisper", {"method": "quarot", "weights": W8, "activations": A8},
                                     prepare=perturb_norms)
    assert err8 < 0.05
    assert isinstance(model.model.encoder.layers[0].fc2, HadamardQuantLinear)
    assert all(r.linears["fc2"]["rotated"] for r in report.records)
    e_rot, _, _ = run_recipe("whisper", {"method": "quarot", "weights": w4, "activations": a4},
                             prepare=perturb_norms)
    e_rtn, _, _ = run_recipe("whisper", {"method": "rtn", "weights": w4, "activations": a4}, prepare=perturb_norms)
    assert e_rot < e_rtn


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quarot_w8a8_close_to_fp(arch, run_recipe):
    err, report, model = run_recipe(arch, {"method": "quarot", "weights": W8, "activations": A8})
    assert err < 0.05
    assert isinstance(model.model.layers[0].mlp.down_proj, HadamardQuantLinear)
    assert report.records[0].linears["mlp.down_proj"]["rotated"] is True


def test_quarot_w4a4_with_gptq_weights(run_recipe, perturb_norms):
    w4, a4 = {"bits": 4, "granularity": "group", "group_size": 32}, {"bits": 4, "granularity": "token"}
    e_rot, _, _ = run_recipe("llama", {"method": "quarot", "weights": w4, "activations": a4,
                                       "weight_method": "gptq"}, prepare=perturb_norms)
    e_rtn, _, _ = run_recipe("llama", {"method": "rtn", "weights": w4, "activations": a4}, prepare=perturb_norms)
    assert e_rot < e_rtn

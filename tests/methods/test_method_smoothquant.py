import pytest
import torch

from morphoquant.methods.channel_scaling import InputTransformQuantLinear
from morphoquant.methods.smoothquant import SmoothQuant, smooth_scales

W8, A8 = {"bits": 8, "granularity": "channel"}, {"bits": 8, "granularity": "token"}


def test_smooth_scales_hand_computed():
    s = smooth_scales(torch.tensor([4.0, 1.0, 0.0, 9.0]), torch.tensor([1.0, 4.0, 2.0, 0.0]), 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))
    assert torch.allclose(smooth_scales(torch.tensor([8.0]), torch.tensor([2.0]), 1.0), torch.tensor([8.0]))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "whisper"])
def test_smoothing_leaves_the_fp_output_unchanged(arch, run_fold_only):
    ref, out, changed = run_fold_only(SmoothQuant, arch, {"alpha": 0.5})
    assert changed > 0                                   # the norms really absorbed 1/s
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_fold_rules_cover_llama_blocks(run_recipe):
    _, report, _model = run_recipe("llama", {"method": "smoothquant", "weights": W8, "activations": A8})
    rec = report.records[0].linears
    assert rec["self_attn.q_proj"]["fold"] == "norm" and "input_layernorm" in rec["self_attn.q_proj"]["group"]
    assert rec["mlp.up_proj"]["fold"] == "norm" and "post_attention_layernorm" in rec["mlp.up_proj"]["group"]
    assert rec["self_attn.o_proj"]["fold"] == "linear" and rec["self_attn.o_proj"]["group"].startswith(
        "self_attn.v_proj")                              # GQA: 4 query heads over 2 value heads
    assert rec["mlp.down_proj"]["fold"] == "linear"
    assert all(v["fold_rel_change"] < 1e-4 for v in rec.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_smoothquant_w8a8_close_to_fp(arch, run_recipe, perturb_norms):
    err, _, _ = run_recipe(arch, {"method": "smoothquant", "weights": W8, "activations": A8},
                           prepare=perturb_norms)
    assert err < 0.05


def test_explicit_scaling_where_nothing_absorbs_it(run_recipe):
    """Whisper fc2 follows a GELU: with explicit: true it is smoothed at run time, and W8A8 stays close to FP."""
    err, _report, model = run_recipe("whisper", {"method": "smoothquant", "options": {"explicit": True},
                                                "weights": W8, "activations": A8})
    assert isinstance(model.model.encoder.layers[0].fc2, InputTransformQuantLinear)
    assert err < 0.05


def test_sequential_mode_skips_unabsorbable_inputs(run_recipe):
    """In sequential mode up_proj is already quantized when down_proj is reached: nothing can absorb the scale,
    so (explicit: false) down_proj is left unsmoothed and the report says so."""
    err, report, _ = run_recipe("llama", {"method": "smoothquant", "weights": W8, "activations": A8,
                                          "sequential": True})
    rec = report.records[0].linears
    assert rec["mlp.down_proj"]["fold"] == "none" and "skipped" in rec["mlp.down_proj"]["transform"]
    assert rec["mlp.gate_proj"]["fold"] == "norm"
    assert err < 0.05


def test_smoothquant_with_gptq_weights(run_recipe, perturb_norms):
    w4 = {"bits": 4, "granularity": "group", "group_size": 32}
    e_gptq, _, _ = run_recipe("llama", {"method": "smoothquant", "weights": w4, "activations": A8,
                                        "weight_method": "gptq"}, prepare=perturb_norms)
    e_rtn, _, _ = run_recipe("llama", {"method": "smoothquant", "weights": w4, "activations": A8},
                             prepare=perturb_norms)
    assert e_gptq < e_rtn

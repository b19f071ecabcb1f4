import pytest
import torch
from torch import nn

from morphoquant.layers import ActivationConfig, QuantLinear
from morphoquant.methods.mquant import (
    HadamardModalityScaledQuantLinear,
    ModalityContextError,
    ModalityScaledQuantLinear,
    modality_context,
)
from morphoquant.numerics import QuantSpec

W8 = {"bits": 8, "granularity": "channel"}
A8_STATIC = {"bits": 8, "granularity": "tensor"}


def _pair(symmetric):
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    act = ActivationConfig(QuantSpec(4, symmetric, "tensor"), dynamic=False)
    spec = QuantSpec(4, True, "channel")
    ranges = {0: (torch.tensor(-1.0), torch.tensor(1.5)), 1: (torch.tensor(-12.0), torch.tensor(9.0))}
    pooled = (torch.tensor(-12.0), torch.tensor(9.0))
    q = ModalityScaledQuantLinear.from_linear(lin, spec, act, act_range=pooled)
    q.set_modality_ranges(ranges, pooled)
    per = {m: QuantLinear.from_linear(lin, spec, act, act_range=r) for m, r in ranges.items()}
    return q, per, QuantLinear.from_linear(lin, spec, act, act_range=pooled)


@pytest.mark.parametrize("symmetric", [True, False])
def test_each_row_uses_its_modality_static_scale(symmetric):
    q, per, pooled = _pair(symmetric)
    x = torch.randn(6, 16) * torch.tensor([1, 1, 8, 8, 1, 8]).reshape(-1, 1)
    ids = torch.tensor([0, 0, 1, 1, -1, 3], dtype=torch.int8)          # text, text, image, image, PAD, unseen
    with torch.no_grad(), modality_context(ids):
        y = q(x)
    with torch.no_grad():
        assert torch.allclose(y[:2], per[0](x[:2]), atol=1e-5)          # text rows: the text scale
        assert torch.allclose(y[2:4], per[1](x[2:4]), atol=1e-5)        # image rows: the image scale
        assert torch.allclose(y[4:], pooled(x[4:]), atol=1e-5)          # padding / unseen: pooled
    # a static scale, not a per-token one: scaling a text row by 2 does not rescale its quantization grid
    with torch.no_grad(), modality_context(ids[:1]):
        a, b = q(x[:1]), q(2 * x[:1])
    assert not torch.allclose(2 * (a - q.bias), b - q.bias, atol=1e-4)


def test_missing_or_mismatched_ids_are_errors():
    q, _, _ = _pair(True)
    with pytest.raises(ModalityContextError, match="modality_context"):
        q(torch.randn(3, 16))
    with modality_context(torch.zeros(5, dtype=torch.int8)), pytest.raises(ModalityContextError, match="5 ids"):
        q(torch.randn(3, 16))


def test_mquant_on_omni_uses_modality_scales_and_stays_close_at_w8a8(run_recipe, modality_hook):
    err, _report, model = run_recipe("qwen2.5-omni-thinker", {"method": "mquant", "options": {"clip_grid": 5},
                                                             "weights": W8, "activations": A8_STATIC})
    layer = model.model.language_model.layers[0]
    assert isinstance(layer.self_attn.q_proj, ModalityScaledQuantLinear)
    assert isinstance(layer.mlp.down_proj, HadamardModalityScaledQuantLinear)      # rotated (auto)
    scales = layer.self_attn.o_proj.act_scale
    assert scales.numel() == 5 and len(set(scales[[0, 1, 3]].tolist())) == 3      # text, image, audio differ
    assert err < 0.05


def test_mquant_single_modality_model_is_plain_static(run_recipe, modality_hook):
    err, _, model = run_recipe("llama", {"method": "mquant", "options": {"rotate": "never", "clip_grid": 5},
                                         "weights": W8, "activations": A8_STATIC})
    lin = model.model.layers[0].self_attn.q_proj
    assert type(lin) is QuantLinear and lin.act_scale.numel() == 1
    assert err < 0.05


def test_mquant_needs_static_per_tensor_activations(run_recipe):
    with pytest.raises(ValueError, match="granularity: tensor"):
        run_recipe("llama", {"method": "mquant", "weights": W8, "activations": {"bits": 8, "granularity": "token"}})

"""Per-modality activation ranges of QuantLinear: hand-checked numerics, runtime bit-exactness, export."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from morphoquant.layers import ActivationConfig, QuantLinear
from morphoquant.numerics import QuantSpec
from morphoquant.numerics.integer_gemm import float_matmul
from morphoquant.runtime import IntegerLinear
from morphoquant.statistics import ModalityContextError, modality_context

FOLDED = ActivationConfig(QuantSpec(4, False, "channel"), False)
TOKEN = ActivationConfig(QuantSpec(4, True, "token"))
W4 = QuantSpec(4, True, "group", 8)


def _layer(act, dabc="none", t=(1.0, 2.0, 1.0, 0.5, 1.0)):
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(16, 5)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(5, 16, generator=g))
    x = torch.randn(64, 16, generator=g)
    rng = (x.amin(0), x.amax(0)) if not act.dynamic else None
    clip = x.abs().amax(0) * 0.8 if act.dynamic else None
    idx = torch.tensor([2, 9]) if dabc != "none" else None
    return QuantLinear.from_linear(lin, W4, act, act_range=rng, act_clip=clip, outlier_idx=idx, dabc=dabc,
                                   modality_scale=torch.tensor(t)), x


def test_folded_row_scale_is_the_range_multiplier():
    """A row of modality m computes exactly what a layer whose range is t_m times wider computes."""
    q, x = _layer(FOLDED)
    ids = torch.tensor([0, 1, 3, -1])
    with modality_context(ids):
        y = q(x[:4], matmul=float_matmul)
    for row, t in zip(range(4), [1.0, 2.0, 0.5, 1.0]):
        # same folded weight, range t times wider: y = t·W'(round(x/(t s)) + z − z) + b
        xq = torch.clamp(torch.round(x[row] / (q.act_scale * t)) + q.act_zero, 0, 15)
        manual = t * (q.dequantized_weight @ (xq - q.act_zero)) + q.bias
        assert torch.allclose(y[row], manual, atol=1e-5)


def test_one_id_broadcasts_and_missing_context_is_an_error():
    q, x = _layer(FOLDED)
    with pytest.raises(ModalityContextError, match="modality_context"):
        q(x)
    with modality_context(torch.tensor([1])):
        a = q(x)
    with modality_context(torch.ones(64, dtype=torch.long)):
        b = q(x)
    assert torch.equal(a, b)
    with modality_context(torch.ones(3, dtype=torch.long)), pytest.raises(ModalityContextError, match="3 ids"):
        q(x)


@pytest.mark.parametrize("act", [FOLDED, TOKEN], ids=["folded", "token"])
@pytest.mark.parametrize("dabc", ["none", "dense", "sparse"])
def test_runtime_is_bit_exact(act, dabc):
    if dabc == "sparse":
        q, x = _layer(act, "dense")
        q.dabc, q.outlier_threshold = "sparse", torch.tensor([0.3, 0.1])
    else:
        q, x = _layer(act, dabc)
    ids = torch.tensor([0, 1, 2, 3, -1] * 12 + [3, 3, 1, 0])
    with modality_context(ids):
        ref = q(x, matmul=float_matmul)
        fast = q(x)
        for kernel in ("int_mm", "auto"):
            assert torch.equal(IntegerLinear(q, kernel)(x), ref)
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-4)


def test_token_clip_scales_per_modality():
    q, x = _layer(TOKEN, t=(1.0, 0.25, 1.0, 1.0, 1.0))
    with modality_context(torch.tensor([1])):
        narrow = q(x * 0 + 100.0)
    q.modality_scale = torch.ones(5)
    with modality_context(torch.tensor([1])):
        wide = q(x * 0 + 100.0)
    assert not torch.allclose(narrow, wide)


def test_bad_modality_scale_is_rejected():
    lin = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="5 entries"):
        QuantLinear.from_linear(lin, QuantSpec(4), FOLDED, act_range=(-torch.ones(4), torch.ones(4)),
                                modality_scale=torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        QuantLinear.from_linear(lin, QuantSpec(4), FOLDED, act_range=(-torch.ones(4), torch.ones(4)),
                                modality_scale=torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="finite act_clip"):
        QuantLinear.from_linear(lin, QuantSpec(4), TOKEN, modality_scale=torch.ones(5))


def test_checkpoint_round_trip_keeps_per_modality_ranges(tmp_path):
    from morphoquant.export import load_quantized, save_quantized
    from morphoquant.models.tiny import tiny_model

    model, factory = tiny_model("qwen2")
    g = torch.Generator().manual_seed(0)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and "model.layers" in name:
            c = mod.in_features
            rng = (-torch.rand(c, generator=g) - 0.2, torch.rand(c, generator=g) + 0.5)
            model.set_submodule(name, QuantLinear.from_linear(
                mod, QuantSpec(4, True, "group", 16), FOLDED, act_range=rng, outlier_idx=torch.tensor([1, 5]),
                dabc="dense", modality_scale=torch.rand(5, generator=g) + 0.5))
    save_quantized(model, tmp_path / "m", verbose=False)
    loaded = load_quantized(tmp_path / "m")
    sample = factory(seed=1)
    ids = torch.randint(0, 4, sample["input_ids"].shape, generator=g)
    with torch.no_grad(), modality_context(ids):
        assert torch.equal(model(**sample).logits, loaded(**sample).logits)
    # the ranges matter: text-only ids give other logits than mixed ones
    with torch.no_grad(), modality_context(torch.tensor([0])):
        text_only = loaded(**sample).logits
    with torch.no_grad(), modality_context(ids):
        assert not torch.equal(text_only, loaded(**sample).logits)

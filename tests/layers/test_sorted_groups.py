"""Scale-sorted weight groups (``group_order: act_scale``): hand-checked numerics, equivalence with a layer
built on permuted inputs, GPTQ, integer runtime bit-exactness and recipe handling."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from morphoquant.layers import ActivationConfig, QuantLinear
from morphoquant.methods.gptq import _bound_quantizer, folded_hessian, hessian_of
from morphoquant.numerics import QuantConfigError, QuantSpec
from morphoquant.numerics.integer_gemm import float_matmul
from morphoquant.pipeline.recipe import RecipeError, parse_recipe, with_format
from morphoquant.runtime import IntegerLinear

FOLDED = ActivationConfig(QuantSpec(4, False, "channel"), False)
SORTED = QuantSpec(4, True, "group", 8, group_order="act_scale")
NATURAL = QuantSpec(4, True, "group", 8)


def _data(c=32, o=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(c, o)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(o, c, generator=g))
    spread = torch.logspace(-1, 1, c)[torch.randperm(c, generator=g)]     # channel ranges over 2 decades
    x = torch.randn(96, c, generator=g) * spread
    return lin, x, (x.amin(0), x.amax(0))


def test_group_order_needs_groups():
    with pytest.raises(QuantConfigError, match="granularity 'group'"):
        QuantSpec(4, True, "channel", group_order="act_scale")
    with pytest.raises(QuantConfigError, match="unknown group_order"):
        QuantSpec(4, True, "group", 8, group_order="hessian")


def test_hand_example_sorting_makes_groups_exact():
    """W = 1, s = [1, 100, 1, 100], groups of 2. The folded weight W·diag(s) = [1, 100, 1, 100]: natural groups
    {0,1},{2,3} get the step 100/7 and round the 1s to 0; sorted groups {0,2},{1,3} are exact."""
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    s = torch.tensor([1.0, 100.0, 1.0, 100.0])
    act = ActivationConfig(QuantSpec(4, True, "channel"), False)
    rng = (-s * 7, s * 7)               # symmetric 4-bit: scale amax / 7 = s
    nat = QuantLinear.from_linear(lin, QuantSpec(4, True, "group", 2), act, act_range=rng)
    srt = QuantLinear.from_linear(lin, QuantSpec(4, True, "group", 2, group_order="act_scale"), act, act_range=rng)
    assert torch.equal(nat.effective_weight(), torch.tensor([[0.0, 1.0, 0.0, 1.0]]))
    assert torch.equal(srt.input_perm, torch.tensor([0, 2, 1, 3]))
    assert torch.equal(srt.act_scale, torch.tensor([1.0, 1.0, 100.0, 100.0]))
    assert torch.allclose(srt.effective_weight(), torch.ones(1, 4))
    x = torch.tensor([[7.0, 300.0, -7.0, 100.0]])       # on the activation grid: x_q exact
    assert torch.allclose(srt(x), x.sum(1, keepdim=True), rtol=1e-6)
    assert torch.allclose(nat(x), torch.tensor([[400.0]]), rtol=1e-6)      # the two 1-scale columns lost


@pytest.mark.parametrize("dabc", ["none", "dense", "sparse"])
def test_sorted_layer_is_a_natural_layer_on_permuted_inputs(dabc):
    """The sorted layer computes exactly what a natural-order layer computes when it is built on the permuted
    problem (weight columns, ranges and outlier channels permuted by π, input x[:, π])."""
    lin, x, (lo, hi) = _data()
    idx = torch.tensor([3, 17, 30]) if dabc != "none" else None
    thr = torch.tensor([0.1, 0.2, 0.3]) if dabc == "sparse" else None
    srt = QuantLinear.from_linear(lin, SORTED, FOLDED, act_range=(lo, hi), outlier_idx=idx, dabc=dabc,
                                  outlier_threshold=thr)
    perm = srt.input_perm
    s_nat = QuantLinear.from_linear(lin, NATURAL, FOLDED, act_range=(lo, hi)).act_scale
    assert torch.equal(perm, torch.argsort(s_nat, stable=True))
    assert bool((srt.act_scale[1:] >= srt.act_scale[:-1]).all())
    lin_p = nn.Linear(lin.in_features, lin.out_features)
    with torch.no_grad():
        lin_p.weight.copy_(lin.weight[:, perm])
        lin_p.bias.copy_(lin.bias)
    inv = torch.argsort(perm)
    ref = QuantLinear.from_linear(lin_p, NATURAL, FOLDED, act_range=(lo[perm], hi[perm]),
                                  outlier_idx=None if idx is None else inv[idx], dabc=dabc, outlier_threshold=thr)
    assert torch.equal(srt.weight_codes, ref.weight_codes) and torch.equal(srt.weight_scale, ref.weight_scale)
    assert torch.equal(srt(x), ref(x[:, perm]))
    assert torch.equal(srt(x, matmul=float_matmul), ref(x[:, perm], matmul=float_matmul))
    assert torch.allclose(srt.effective_weight(), ref.effective_weight()[:, inv])


def test_sorting_lowers_the_weight_error_when_scales_spread():
    lin, _, rng = _data(c=64, seed=1)
    err = {}
    for name, spec in (("natural", NATURAL), ("sorted", SORTED)):
        q = QuantLinear.from_linear(lin, spec, FOLDED, act_range=rng)
        w = lin.weight.detach()
        err[name] = float((q.effective_weight() - w).norm() / w.norm())
    assert err["sorted"] < 0.7 * err["natural"]


def test_no_effect_without_static_per_channel_scales():
    lin, x, _ = _data()
    for act in (None, ActivationConfig(QuantSpec(4, True, "token"))):
        a = QuantLinear.from_linear(lin, SORTED, act)
        b = QuantLinear.from_linear(lin, NATURAL, act)
        assert not a.permuted and torch.equal(a.weight_codes, b.weight_codes) and torch.equal(a(x), b(x))


def test_gptq_sees_the_permuted_hessian():
    """GPTQ on the sorted layer = GPTQ on the permuted problem; folded_hessian = P H Pᵀ / (s sᵀ)."""
    lin, x, (lo, hi) = _data(seed=2)
    h = hessian_of(x)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    s = torch.rand(32) + 0.5
    assert torch.allclose(folded_hessian(h, s, perm), h[perm][:, perm] / s[:, None] / s[None, :])
    srt = QuantLinear.from_linear(lin, SORTED, FOLDED, act_range=(lo, hi),
                                  weight_quantizer=_bound_quantizer(h, SORTED, 0.01, 8, True))
    p = srt.input_perm
    lin_p = nn.Linear(32, lin.out_features)
    with torch.no_grad():
        lin_p.weight.copy_(lin.weight[:, p])
        lin_p.bias.copy_(lin.bias)
    ref = QuantLinear.from_linear(lin_p, NATURAL, FOLDED, act_range=(lo[p], hi[p]),
                                  weight_quantizer=_bound_quantizer(h[p][:, p], NATURAL, 0.01, 8, True))
    assert torch.equal(srt.weight_codes, ref.weight_codes) and torch.allclose(srt.weight_scale, ref.weight_scale)


@pytest.mark.parametrize("dabc", ["none", "dense"])
def test_integer_runtime_is_bit_exact(dabc):
    lin, x, rng = _data(seed=3)
    q = QuantLinear.from_linear(lin, SORTED, FOLDED, act_range=rng, dabc=dabc,
                                outlier_idx=torch.tensor([1, 9]) if dabc == "dense" else None)
    r = IntegerLinear(q, keep_reference=True)
    assert torch.equal(r(x), q(x, matmul=float_matmul))
    assert torch.equal(r.reference_forward(x), q(x, matmul=float_matmul))


def test_recipe_option_and_format_move():
    data = {"name": "t", "method": "rtn", "weights": {"group_size": 8, "group_order": "act_scale"}}
    assert parse_recipe(data).weights.spec().group_order == "act_scale"
    moved = with_format(data, "w8a8")
    assert moved["weights"]["group_order"] == "natural" and moved["weights"]["granularity"] == "channel"
    assert parse_recipe(with_format(data, "w4a8")).weights.group_order == "act_scale"
    with pytest.raises(RecipeError, match="granularity 'group'"):
        parse_recipe({"name": "t", "method": "rtn", "weights": {"granularity": "channel", "group_order": "act_scale"}})

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from morphoquant.numerics import (
    FP4_E2M1_LEVELS,
    NF4_LEVELS,
    QuantConfigError,
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize,
    quantize_weight,
    range_qparams,
)

BITS = st.integers(2, 8)


def _tensor(seed, rows, cols, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * scale


def test_symmetric_int4_hand_computed():
    spec = QuantSpec(bits=4, symmetric=True, granularity="tensor")
    x = torch.tensor([[-7.0, -1.2, 0.0, 0.5, 3.5, 7.0]])
    s, z = compute_qparams(x, spec, "activation")
    assert s.item() == pytest.approx(1.0) and z.item() == 0
    q = quantize(x, s, z, spec)
    # round half to even: 0.5 -> 0, 3.5 -> 4
    assert q.tolist() == [[-7, -1, 0, 0, 4, 7]]
    assert q.dtype == torch.int8


def test_asymmetric_range_includes_zero_hand_computed():
    spec = QuantSpec(bits=4, symmetric=False, granularity="tensor")
    s, z = range_qparams(torch.tensor(1.0), torch.tensor(16.0), spec)   # lo clamped to 0
    assert s.item() == pytest.approx(16 / 15) and z.item() == 0
    s, z = range_qparams(torch.tensor(-3.0), torch.tensor(12.0), spec)
    assert s.item() == pytest.approx(1.0) and z.item() == 3
    x = torch.tensor([-3.0, 0.0, 12.0, 20.0])
    assert quantize(x, s, z, spec).tolist() == [0, 3, 15, 15]


def test_params_are_fp32_for_bf16_input():
    x = torch.randn(4, 16).to(torch.bfloat16)
    for sym in (True, False):
        s, z = compute_qparams(x, QuantSpec(4, sym, "token"), "activation")
        assert s.dtype == torch.float32 and z.dtype == torch.float32


def test_zero_tensor_gives_finite_scale():
    spec = QuantSpec(4, True, "channel")
    qt = quantize_weight(torch.zeros(3, 8), spec)
    assert torch.isfinite(qt.scale).all() and (qt.dequantize() == 0).all()


@pytest.mark.parametrize("bad", [{"bits": 0}, {"bits": 9}, {"granularity": "group"},
                                 {"granularity": "group", "group_size": 0}, {"fmt": "nf4", "bits": 3},
                                 {"granularity": "row"}])
def test_bad_specs_raise(bad):
    with pytest.raises(QuantConfigError):
        QuantSpec(**bad)


def test_granularity_shapes():
    x = _tensor(0, 6, 10)
    s, _ = compute_qparams(x, QuantSpec(4, True, "channel"), "weight")
    assert s.shape == (6, 1)
    s, _ = compute_qparams(x, QuantSpec(4, True, "channel"), "activation")
    assert s.shape == (10,)
    s, _ = compute_qparams(x, QuantSpec(4, True, "token"), "activation")
    assert s.shape == (6, 1)
    s, _ = compute_qparams(x, QuantSpec(4, True, "group", 4), "weight")
    assert s.shape == (6, 3, 1)          # 10 channels in groups of 4: last group partial


def test_partial_group_matches_explicit_split():
    x = _tensor(1, 3, 10)
    spec = QuantSpec(4, True, "group", 4)
    y = fake_quantize(x, spec, "weight")
    for a, b in ((0, 4), (4, 8), (8, 10)):
        part = x[:, a:b]
        ref = fake_quantize(part, QuantSpec(4, True, "channel"), "weight")
        torch.testing.assert_close(y[:, a:b], ref, rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(bits=BITS, sym=st.booleans(), gran=st.sampled_from(["tensor", "channel", "group", "token"]),
       seed=st.integers(0, 10_000), rows=st.integers(1, 7), cols=st.integers(1, 19), gs=st.integers(1, 8))
def test_round_trip_properties(bits, sym, gran, seed, rows, cols, gs):
    spec = QuantSpec(bits, sym, gran, gs if gran == "group" else None)
    role = "activation" if gran in ("token",) else "weight"
    x = _tensor(seed, rows, cols)
    s, z = compute_qparams(x, spec, role)
    q = quantize(x, s, z, spec)
    # exact clamping: every code inside the grid
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    xh = dequantize(q, s, z, spec)
    # idempotence: quantizing the dequantized tensor with the same parameters gives the same codes
    assert torch.equal(quantize(xh, s, z, spec), q)
    # error at most half a step inside the representable range
    if gran == "group":
        from morphoquant.numerics.quantizers import _group_view, _ungroup
        step = _ungroup(s.expand(*_group_view(x, gs)[0].shape), cols)
    else:
        step = s.expand_as(x)
    assert ((x - xh).abs() <= step / 2 + 1e-5 * (1 + x.abs())).all()


@settings(max_examples=30, deadline=None)
@given(bits=BITS, sym=st.booleans(), seed=st.integers(0, 1000))
def test_clamping_outside_range(bits, sym, seed):
    spec = QuantSpec(bits, sym, "tensor")
    s, z = range_qparams(torch.tensor(-1.0), torch.tensor(1.0), spec)
    x = _tensor(seed, 4, 8, scale=50.0)
    q = quantize(x, s, z, spec)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    big = x > 10
    assert (q[big] == spec.qmax).all()


@pytest.mark.parametrize("fmt,levels,den", [("nf4", NF4_LEVELS, 1.0), ("fp4", FP4_E2M1_LEVELS, 6.0)])
def test_codebooks(fmt, levels, den):
    spec = QuantSpec(4, True, "group", 8, fmt=fmt)
    w = _tensor(3, 4, 16)
    qt = quantize_weight(w, spec)
    assert qt.codes.dtype == torch.uint8 and int(qt.codes.max()) <= 15
    wh = qt.dequantize()
    # every dequantized value is a level times its group scale, and the absmax of each group is exact
    grouped = w.reshape(4, 2, 8)
    amax = grouped.abs().amax(-1)
    torch.testing.assert_close(wh.reshape(4, 2, 8).abs().amax(-1), amax, rtol=1e-6, atol=1e-6)
    # nearest level: error no larger than half the largest gap between levels times the scale
    gap = torch.diff(torch.sort(levels).values).max()
    assert ((w - wh).abs().reshape(4, 2, 8) <= (amax / den * gap / 2).unsqueeze(-1) + 1e-6).all()
    assert math.isclose(float(torch.sort(levels).values[-1]), den)


def test_weight_rejects_token_granularity():
    with pytest.raises(QuantConfigError):
        quantize_weight(torch.randn(2, 4), QuantSpec(4, True, "token"))


def test_full_range_symmetric_int4_hand_computed():
    from morphoquant.numerics import QuantConfigError, QuantSpec, compute_qparams, dequantize, quantize
    spec = QuantSpec(4, True, "channel", full_range=True)
    w = torch.tensor([[-1.0, 0.5, 1.0, 0.0]])
    s, z = compute_qparams(w, spec, "weight")
    assert torch.allclose(s, torch.tensor([[1 / 7.5]]))
    q = quantize(w, s, z, spec)
    # ±amax sit on rounding boundaries (±7.5): +1 rounds up to 8 and is clipped to 7; fp32 1/7.5 is rounded up,
    # so -1/s = -7.4999996 rounds to -7; 3.75 -> 4; 0 -> 0
    assert q.tolist() == [[-7, 4, 7, 0]]
    assert torch.allclose(dequantize(q, s, z, spec), torch.tensor([[-7 / 7.5, 4 / 7.5, 7 / 7.5, 0.0]]))
    # just beyond the boundary the code q_min is used
    assert quantize(torch.tensor([[-1.00001, 1.0]]), s, z, spec).tolist() == [[-8, 7]]
    # the default rule: amax / 7, codes -7..7
    d = QuantSpec(4, True, "channel")
    s0, z0 = compute_qparams(w, d, "weight")
    assert quantize(w, s0, z0, d).tolist() == [[-7, 3, 7, 0]]      # 0.5 / fp32(1/7) = 3.4999998
    with pytest.raises(QuantConfigError, match="full_range"):
        QuantSpec(4, False, "channel", full_range=True)
    with pytest.raises(QuantConfigError, match="full_range"):
        QuantSpec(4, True, "channel", fmt="nf4", full_range=True)


def test_full_range_lowers_the_error_of_gaussian_weights_in_groups_of_64():
    from morphoquant.numerics import QuantSpec, compute_qparams, dequantize, quantize
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g)
    errs = {}
    for fr in (False, True):
        spec = QuantSpec(4, True, "group", 64, full_range=fr)
        s, z = compute_qparams(w, spec, "weight")
        errs[fr] = float((dequantize(quantize(w, s, z, spec), s, z, spec) - w).pow(2).mean())
    assert errs[True] < 0.95 * errs[False]

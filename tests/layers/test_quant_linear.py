import pytest
import torch
from torch import nn

from morphoquant.layers import ActivationConfig, QuantLinear
from morphoquant.numerics import (
    QuantSpec,
    fake_quantize,
    quantize,
    quantize_weight,
    range_qparams,
)
from morphoquant.numerics.integer_gemm import float_matmul


def _lin(c=24, o=10, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(c, o, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(3)
    return lin


def _x(n=7, c=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    x[:, 3] *= 40          # an outlier channel
    return x


W4G = QuantSpec(4, True, "group", 8)
W4C = QuantSpec(4, True, "channel")


def _int_mm(a, b):
    # exact int8 x int8 -> int32 GEMM; pad rows to the kernel's minimum of 17
    n = a.shape[0]
    pad = max(0, 17 - n)
    a8 = torch.nn.functional.pad(a.to(torch.int8), (0, 0, 0, pad))
    return torch._int_mm(a8, b.to(torch.int8).T.contiguous())[:n].float()


def test_weight_only_equals_dequantized_matmul():
    lin = _lin()
    q = QuantLinear.from_linear(lin, W4G, None)
    x = _x()
    w = quantize_weight(lin.weight, W4G).dequantize()
    torch.testing.assert_close(q(x), x @ w.T + lin.bias)


@pytest.mark.parametrize("sym", [True, False])
def test_dynamic_per_token_equals_fake_quant_product(sym):
    lin = _lin()
    act = ActivationConfig(QuantSpec(4, sym, "token"), dynamic=True)
    q = QuantLinear.from_linear(lin, W4C, act)
    x = _x()
    xh = fake_quantize(x, QuantSpec(4, sym, "token"), "activation")
    w = quantize_weight(lin.weight, W4C).dequantize()
    torch.testing.assert_close(q(x), xh @ w.T + lin.bias, rtol=1e-5, atol=1e-4)


def test_static_per_channel_folds_scales_before_weight_quantization():
    lin = _lin()
    x = _x()
    spec = QuantSpec(4, False, "channel")
    lo, hi = x.amin(0), x.amax(0)
    q = QuantLinear.from_linear(lin, W4C, ActivationConfig(spec, dynamic=False), act_range=(lo, hi))
    s, z = range_qparams(lo, hi, spec)
    x_q = quantize(x, s, z, spec).float()
    w_folded = quantize_weight(lin.weight * s, W4C).dequantize()     # W' = W diag(s), then quantized
    expected = (x_q - z) @ w_folded.T + lin.bias
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-4)
    # the non-deployable "quantize W, then rescale activations" differs: folding is not a no-op
    naive = ((x_q - z) * s) @ quantize_weight(lin.weight, W4C).dequantize().T + lin.bias
    assert not torch.allclose(q(x), naive, atol=1e-3)


def test_dabc_dense_all_channels_recovers_full_precision_activations():
    lin = _lin()
    x = _x()
    act = ActivationConfig(QuantSpec(4, True, "token"))
    q = QuantLinear.from_linear(lin, W4C, act, outlier_idx=torch.arange(24), dabc="dense")
    w = quantize_weight(lin.weight, W4C).dequantize()
    torch.testing.assert_close(q(x), x @ w.T + lin.bias, rtol=1e-5, atol=1e-4)


def test_dabc_eq7_equals_direct_computation():
    lin = _lin()
    x = _x()
    spec = QuantSpec(4, False, "channel")
    idx = torch.tensor([3, 7])
    q = QuantLinear.from_linear(lin, W4C, ActivationConfig(spec, False), act_range=(x.amin(0) * .5, x.amax(0) * .5),
                                outlier_idx=idx, dabc="dense")
    s, z = q.act_scale, q.act_zero
    x_q = torch.clamp(torch.round(x / s) + z, 0, 15)
    xhat = s * (x_q - z)
    m = torch.zeros(24)
    m[idx] = 1
    w_q = q.dequantized_weight / s          # W_Q in the units of x
    direct = xhat @ w_q.T + lin.bias + ((x - xhat) * m) @ w_q.T
    torch.testing.assert_close(q(x), direct, rtol=1e-4, atol=1e-3)


def test_sparse_dabc_bypasses_only_elements_above_threshold():
    lin = _lin(c=8, o=4)
    x = torch.zeros(2, 8)
    x[0, 2], x[1, 2] = 10.0, 0.5
    x[:, 0] = 1.0
    spec = QuantSpec(4, True, "channel")
    act = ActivationConfig(spec, False)
    lo, hi = -torch.ones(8), torch.ones(8)
    q = QuantLinear.from_linear(lin, W4C, act, act_range=(lo, hi), outlier_idx=torch.tensor([2]), dabc="sparse",
                                outlier_threshold=torch.tensor([0.8]))
    q.track_bypass = True
    y = q(x)
    assert q.bypass_elements == 1          # only x[0, 2] = 10 > 0.8 takes the 16-bit path
    # the bypassed element is bit-exact: its full value goes through W_Q
    w_q = q.dequantized_weight / q.act_scale
    expect0 = x[0] @ w_q.T + lin.bias       # every other element of row 0 is exactly representable
    torch.testing.assert_close(y[0], expect0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wspec", [W4C, W4G, QuantSpec(4, True, "group", 5)])
@pytest.mark.parametrize("act", [ActivationConfig(QuantSpec(4, True, "token")),
                                 ActivationConfig(QuantSpec(8, True, "token")),
                                 ActivationConfig(QuantSpec(4, False, "token")),
                                 ActivationConfig(QuantSpec(4, False, "channel"), False)])
def test_fake_path_is_bit_exact_with_int8_kernel(wspec, act):
    lin = _lin(c=24, o=16)
    x = _x(n=20)
    rng = (x.amin(0), x.amax(0)) if not act.dynamic else None
    q = QuantLinear.from_linear(lin, wspec, act, act_range=rng)
    exact = q(x, matmul=float_matmul)
    assert torch.equal(exact, q(x, matmul=_int_mm))
    # the fast single-GEMM path agrees with the integer product to fp32 rounding
    torch.testing.assert_close(q(x), exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))


def test_nf4_weights_with_int_activations_run():
    lin = _lin()
    q = QuantLinear.from_linear(lin, QuantSpec(4, True, "group", 8, fmt="nf4"),
                                ActivationConfig(QuantSpec(8, True, "token")))
    y = q(_x())
    ref = _lin()(_x())
    assert torch.isfinite(y).all() and (y - ref).norm() / ref.norm() < 0.2


def test_static_quantizer_requires_range():
    with pytest.raises(ValueError, match="act_range"):
        QuantLinear.from_linear(_lin(), W4C, ActivationConfig(QuantSpec(4, False, "channel"), False))


def test_state_dict_round_trip():
    lin = _lin()
    act = ActivationConfig(QuantSpec(4, False, "channel"), False)
    x = _x()
    q = QuantLinear.from_linear(lin, W4G, act, act_range=(x.amin(0), x.amax(0)), outlier_idx=torch.tensor([3]),
                                dabc="dense")
    q2 = QuantLinear(24, 10, W4G, act, True, "dense")
    q2.outlier_idx = torch.zeros(1, dtype=torch.long)
    q2.act_scale, q2.act_zero = torch.ones(24), torch.zeros(24)
    q2.weight_scale = torch.ones_like(q.weight_scale)
    q2.weight_zero = torch.zeros_like(q.weight_zero)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2(x), q(x))

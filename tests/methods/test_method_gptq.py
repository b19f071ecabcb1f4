import pytest
import torch

from morphoquant.methods.gptq import gptq_quantize, hessian_of, inverse_hessian_factor
from morphoquant.numerics import QuantSpec, quantize_weight

W8, A8 = {"bits": 8, "granularity": "channel"}, {"bits": 8, "granularity": "token"}
W4G = {"bits": 4, "granularity": "group", "group_size": 32}


def _layer(seed=0, n=384, c=64, o=24):
    """Correlated inputs (a random mixing) with one large channel, and a random weight."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=g) * 0.4 + torch.eye(c)
    x = torch.randn(n, c, generator=g) @ mix
    x[:, 3] *= 6
    w = torch.randn(o, c, generator=g)
    return x, w


def _err(x, w, w_hat):
    return float((x @ w.T - x @ w_hat.T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("spec", [QuantSpec(4, True, "group", 16), QuantSpec(4, True, "channel"),
                                  QuantSpec(3, False, "group", 16), QuantSpec(4, True, "group", 16, "nf4")])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn(spec, act_order):
    x, w = _layer()
    q = gptq_quantize(w, hessian_of(x), spec, act_order=act_order, block_size=16)
    rtn = quantize_weight(w, spec)
    assert q.scale.shape == rtn.scale.shape and q.codes.dtype == rtn.codes.dtype   # an ordinary layout
    assert _err(x, w, q.dequantize()) < 0.8 * _err(x, w, rtn.dequantize())


@pytest.mark.parametrize("act_order", [False, True])
def test_lazy_blocks_do_not_change_the_result(act_order):
    x, w = _layer(1, c=48)
    spec = QuantSpec(4, True, "group", 16)
    h = hessian_of(x)
    a = gptq_quantize(w, h, spec, act_order=act_order, block_size=1).dequantize()
    b = gptq_quantize(w, h, spec, act_order=act_order, block_size=7).dequantize()
    c = gptq_quantize(w, h, spec, act_order=act_order, block_size=128).dequantize()
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)


def test_act_order_keeps_static_natural_groups():
    """Codes and scales index natural columns: dequantize() reproduces what GPTQ rounded to, and every code is
    representable with its natural group's scale."""
    x, w = _layer(2, c=40)
    spec = QuantSpec(4, False, "group", 16)             # asymmetric, last group partial (40 = 16 + 16 + 8)
    q = gptq_quantize(w, hessian_of(x), spec, act_order=True)
    assert q.scale.shape == (w.shape[0], 3, 1)
    assert int(q.codes.min()) >= spec.qmin and int(q.codes.max()) <= spec.qmax
    deq = q.dequantize()
    assert deq.shape == w.shape and torch.isfinite(deq).all()


def test_dead_columns_are_zero_and_finite():
    x, w = _layer(3, c=32)
    x[:, [0, 5, 31]] = 0.0
    q = gptq_quantize(w, hessian_of(x), QuantSpec(4, True, "group", 8))
    deq = q.dequantize()
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[:, [0, 5, 31]], torch.zeros(w.shape[0], 3))
    all_dead = gptq_quantize(w, torch.zeros(32, 32), QuantSpec(4, True, "channel"))
    assert torch.equal(all_dead.dequantize(), torch.zeros_like(w))


def test_damping_rescues_a_singular_hessian():
    x = torch.randn(8, 16)                              # rank 8 < 16
    u = inverse_hessian_factor(hessian_of(x), damp=1e-12)
    assert torch.isfinite(u).all()


def test_method_gptq_equals_rtn_with_gptq_weights(run_recipe):
    """``method: gptq`` (Hessians collected by the method) == ``method: rtn`` + ``weight_method: gptq``."""
    base = {"weights": W4G, "activations": A8, "gptq": {"damp": 0.01, "block_size": 128, "act_order": True}}
    e1, rep1, m1 = run_recipe("llama", {**base, "method": "gptq"})
    e2, _rep2, m2 = run_recipe("llama", {**base, "method": "rtn", "weight_method": "gptq"})
    assert e1 == pytest.approx(e2, rel=1e-4, abs=1e-7)
    lin1 = m1.model.layers[0].mlp.down_proj
    lin2 = m2.model.layers[0].mlp.down_proj
    assert torch.equal(lin1.weight_codes, lin2.weight_codes)
    assert rep1.records[0].linears["mlp.down_proj"]["hessian"] == "method"


def test_method_gptq_w8a8_close_to_fp(run_recipe):
    err, _, _ = run_recipe("qwen2", {"method": "gptq", "weights": W8, "activations": A8})
    assert err < 0.05

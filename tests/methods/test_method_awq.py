import pytest
import torch
from torch import nn

from morphoquant.methods.awq import AWQ, awq_scales, clip_search
from morphoquant.methods.base import BlockContext
from morphoquant.numerics import QuantSpec, quantize_weight
from morphoquant.statistics import InputSampler, ModalityStats

W8, A8 = {"bits": 8, "granularity": "channel"}, {"bits": 8, "granularity": "token"}
W4G, A16 = {"bits": 4, "granularity": "group", "group_size": 32}, {"bits": 16}


class ScaleRMSNorm(nn.Module):
    """A norm that only multiplies by its weight (so the linears see exactly the rows we feed)."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return x * self.weight


class TwoHeads(nn.Module):
    def __init__(self, c=32, o=16):
        super().__init__()
        self.input_norm = ScaleRMSNorm(c)
        self.a = nn.Linear(c, o)
        self.b = nn.Linear(c, o)

    def forward(self, x):
        h = self.input_norm(x)
        return self.a(h) + self.b(h)


def _ctx(x, seed=0):
    spec = QuantSpec(4, True, "group", 8)
    torch.manual_seed(seed)
    block = TwoHeads(x.shape[1]).eval()
    ids = torch.zeros(x.shape[0], dtype=torch.int8)
    stats, sampler = {}, InputSampler(4096)
    for name in ("a", "b"):
        stats[name] = ModalityStats(x.shape[1], name)
        stats[name].update(x, ids)
        sampler(name, x, ids)

    def rerun(observers=()):
        with torch.no_grad():
            return [block(x)]
    return BlockContext("text", 0, block, {"a": block.a, "b": block.b}, stats, spec, None, sampler, rerun=rerun)


def test_awq_scales_normalised_and_flat_is_one():
    assert torch.equal(awq_scales(torch.full((7,), 0.37), 0.6), torch.ones(7))
    s = awq_scales(torch.tensor([1.0, 4.0, 16.0]), 0.5)
    assert torch.allclose(s, torch.tensor([0.5, 1.0, 2.0]))


def test_search_returns_scale_one_for_flat_activations():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (256, 32), generator=g).float() * 2 - 1       # |x| = 1 in every channel
    ctx = _ctx(x)
    transforms, _ = AWQ({"grid": 10, "clip": False}).transform_block(ctx)
    assert torch.equal(transforms["a"].scale, torch.ones(32))
    assert torch.equal(ctx.block.input_norm.weight.detach(), torch.ones(32))


def test_search_protects_a_salient_channel():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=g)
    x[:, 5] *= 25
    ctx = _ctx(x)
    transforms, _ = AWQ({"grid": 10, "clip": False}).transform_block(ctx)
    rep = ctx.report["a"]
    assert rep["alpha"] > 0 and rep["loss"] < rep["loss_identity"]
    s = transforms["a"].scale
    assert int(s.argmax()) == 5 and float(s[5]) > 1
    # the fold kept the function: norm weight is 1/s
    assert torch.allclose(ctx.block.input_norm.weight.detach(), 1 / s)


def test_clip_search_never_worse_than_no_clip():
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(8, 32, generator=g), torch.randn(128, 32, generator=g)
    spec = QuantSpec(3, True, "group", 16)
    r = clip_search(w, x, spec, grid=10, low=0.5)
    assert r.shape == (8, 2, 1) and float(r.min()) >= 0.5 and float(r.max()) <= 1.0
    e_clip = (x @ (w - quantize_weight(w, spec, r).dequantize()).T).pow(2).sum()
    e_none = (x @ (w - quantize_weight(w, spec).dequantize()).T).pow(2).sum()
    assert e_clip <= e_none


def test_awq_w4a16_beats_rtn_with_outliers(run_recipe, perturb_norms):
    e_awq, _rep, _ = run_recipe("llama", {"method": "awq", "options": {"grid": 8}, "weights": W4G,
                                         "activations": A16}, prepare=perturb_norms)
    e_rtn, _, _ = run_recipe("llama", {"method": "rtn", "weights": W4G, "activations": A16}, prepare=perturb_norms)
    assert e_awq < e_rtn


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_awq_w8a8_close_to_fp(arch, run_recipe):
    err, _, _ = run_recipe(arch, {"method": "awq", "options": {"grid": 4, "clip_grid": 4}, "weights": W8,
                                  "activations": A8})
    assert err < 0.05

import pytest
import torch
from torch import nn

from morphoquant.layers import ActivationConfig
from morphoquant.methods.base import BlockContext
from morphoquant.methods.channel_scaling import InputTransformQuantLinear
from morphoquant.methods.osplus import OSPlus
from morphoquant.numerics import QuantSpec
from morphoquant.statistics import InputSampler, ModalityStats

W8, A8 = {"bits": 8, "granularity": "channel"}, {"bits": 8, "granularity": "token"}


class ForcedOSPlus(OSPlus):
    """OS+ with a fixed, non-trivial transform (so the FP-equivalence test always exercises shift and scale)."""

    def choose(self, ctx, g, data):
        st = data.stats.all
        lo, hi = g.reduce(st.min, "amin"), g.reduce(st.max, "amax")
        gen = torch.Generator().manual_seed(g.n_producer)
        return torch.rand(g.n_producer, generator=gen) * 1.5 + 0.5, (hi + lo) / 2, {}


@pytest.mark.parametrize("arch", ["whisper", "qwen2"])
def test_shift_and_scale_leave_the_fp_output_unchanged(arch, run_fold_only):
    """Whisper: LayerNorm biases absorb the shift, v_proj biases the o_proj shift; Qwen2: v_proj bias for o_proj,
    RMSNorm groups scale only (explicit: false)."""
    ref, out, changed = run_fold_only(ForcedOSPlus, arch, {"explicit": False})
    assert changed > 0
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


class Bare(nn.Module):
    def __init__(self, c=16, o=8):
        super().__init__()
        self.fc = nn.Linear(c, o)

    def forward(self, x):
        return self.fc(torch.relu(x) + x)       # not a norm: nothing can absorb a transform


def _ctx(x, act):
    torch.manual_seed(0)
    block = Bare(x.shape[1]).eval()
    inner = torch.relu(x) + x
    ids = torch.zeros(x.shape[0], dtype=torch.int8)
    stats, sampler = {"fc": ModalityStats(x.shape[1], "fc")}, InputSampler(4096)
    stats["fc"].update(inner, ids)
    sampler("fc", inner, ids)

    def rerun(observers=()):
        with torch.no_grad():
            return [block(x)]
    return BlockContext("text", 0, block, {"fc": block.fc}, stats, QuantSpec(8, True, "channel"), act, sampler,
                        rerun=rerun), inner


def test_shift_is_the_channel_midrange_and_explicit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g) + torch.linspace(-3, 3, 16)      # shifted channels
    ctx, inner = _ctx(x, ActivationConfig(QuantSpec(4, True, "token"), True))
    q = OSPlus({"grid": 8}).quantize_block(ctx)["fc"]
    rep = ctx.report["fc"]
    assert rep["loss"] < rep["loss_identity"]
    assert isinstance(q, InputTransformQuantLinear)
    lo, hi = inner.amin(0), inner.amax(0)
    assert torch.allclose(q.input_shift, (hi + lo) / 2, atol=1e-6)         # scale absorbed nowhere: x − z, / s


def test_bias_uses_the_quantized_weight():
    """With 16-bit activations the layer is exactly Ŵ'·x/s + b: the run-time shift cancels through the bias
    term Ŵ'·z/s computed from the *quantized* weight."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 16, generator=g) + 2.0
    ctx, inner = _ctx(x, None)
    ctx.weight_spec = QuantSpec(4, True, "channel")
    b0 = ctx.block.fc.bias.detach().clone()
    q = OSPlus({"grid": 8}).quantize_block(ctx)["fc"]
    assert isinstance(q, InputTransformQuantLinear) and bool(q.input_shift.abs().gt(0).any())
    with torch.no_grad():
        y = q(inner)
    assert torch.allclose(y, inner @ (q.dequantized_weight / q.input_scale).T + b0, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "whisper"])
def test_osplus_w8a8_close_to_fp(arch, run_recipe, perturb_norms):
    err, _report, _ = run_recipe(arch, {"method": "osplus", "options": {"grid": 6}, "weights": W8, "activations": A8},
                                prepare=perturb_norms)
    assert err < 0.05

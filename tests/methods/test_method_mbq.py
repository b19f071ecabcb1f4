import pytest
import torch
from torch import nn

from morphoquant.layers import ActivationConfig
from morphoquant.methods.base import BlockContext
from morphoquant.methods.channel_scaling import modality_weights
from morphoquant.methods.mbq import MBQ
from morphoquant.numerics import QuantSpec
from morphoquant.statistics import InputSampler, ModalityStats

W8, A8 = {"bits": 8, "granularity": "channel"}, {"bits": 8, "granularity": "token"}


def test_modality_weights():
    ids = torch.tensor([0, 0, 0, 1], dtype=torch.int8)
    assert torch.allclose(modality_weights(ids, 4, "pooled"), torch.full((4,), 0.25))
    assert torch.allclose(modality_weights(ids, 4, "balanced"), torch.tensor([1 / 6, 1 / 6, 1 / 6, 0.5]))
    assert torch.allclose(modality_weights(ids, 4, {"text": 3.0, "image": 1.0}),
                          torch.tensor([0.25, 0.25, 0.25, 0.25]))
    assert torch.allclose(modality_weights(ids, 4, {"text": 1.0, "image": 1.0}).sum(), torch.tensor(1.0))


class ScaleRMSNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return x * self.weight


class Proj(nn.Module):
    def __init__(self, c=32, o=16):
        super().__init__()
        self.input_norm = ScaleRMSNorm(c)
        self.fc = nn.Linear(c, o)

    def forward(self, x):
        return self.fc(self.input_norm(x))


def _mixed_ctx():
    """240 text rows without outliers, 16 image rows with a huge channel (the minority modality)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    text = torch.randn(240, 32, generator=g)
    image = torch.randn(16, 32, generator=g)
    image[:, 3] *= 40
    x = torch.cat([text, image])
    ids = torch.cat([torch.zeros(240), torch.ones(16)]).to(torch.int8)
    block = Proj().eval()
    stats, sampler = {"fc": ModalityStats(32, "fc")}, InputSampler(4096)
    stats["fc"].update(x, ids)
    sampler("fc", x, ids)

    def rerun(observers=()):
        with torch.no_grad():
            return [block(x)]
    act = ActivationConfig(QuantSpec(4, True, "token"), True)
    return BlockContext("text", 0, block, {"fc": block.fc}, stats, QuantSpec(4, True, "group", 8), act, sampler,
                        rerun=rerun)


def test_balanced_weighting_protects_the_minority_modality():
    losses = {}
    for weighting in ("pooled", "balanced"):
        ctx = _mixed_ctx()
        MBQ({"grid": 10, "modality_weighting": weighting}).transform_block(ctx)
        rep = ctx.report["fc"]
        assert rep["loss"] <= rep["loss_identity"]
        losses[weighting] = rep["loss_by_modality"]
    assert set(losses["balanced"]) == {"all", "text", "image"}
    assert losses["balanced"]["image"] <= losses["pooled"]["image"]


def test_mbq_on_omni_thinker_reports_every_modality(run_recipe):
    w4 = {"bits": 4, "granularity": "group", "group_size": 32}
    err, report, _ = run_recipe("qwen2.5-omni-thinker", {"method": "mbq", "options": {"grid": 4},
                                                         "weights": w4, "activations": A8})
    rec = report.records[0].linears["self_attn.q_proj"]
    assert {"text", "image", "audio"} <= set(rec["loss_by_modality"])
    assert rec["loss"] <= rec["loss_identity"]
    assert err < 0.5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mbq_w8a8_close_to_fp(arch, run_recipe, perturb_norms):
    err, _, _ = run_recipe(arch, {"method": "mbq", "options": {"grid": 4}, "weights": W8, "activations": A8},
                           prepare=perturb_norms)
    assert err < 0.05

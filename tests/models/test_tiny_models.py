"""The tiny random models and their sample factories (used by every other test suite)."""
from __future__ import annotations

import pytest
import torch

from morphoquant.models.tiny import EXTRA_ARCHS, TINY_ARCHS, sample_factory, tiny_model


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_is_small_fp32_eval(tiny, arch):
    model, _ = tiny(arch)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training


@pytest.mark.parametrize("arch", TINY_ARCHS + EXTRA_ARCHS)
def test_tiny_forward_runs(tiny, arch):
    """Forward works and is finite. (Typically 2-30 ms; not asserted: CI machines are shared and loaded.)"""
    model, make = tiny(arch)
    sample = make()
    net = model.thinker if arch == "qwen2.5-omni" else model
    with torch.no_grad():
        out = net(**sample)
    assert torch.isfinite(out[0]).all()
    assert out[0].shape[:2] == (sample.get("decoder_input_ids", sample.get("input_ids",
                                                                           torch.empty(2, 17)))).shape[:2]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_are_deterministic_and_keep_global_rng(arch):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, make = tiny_model(arch, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    b, _ = tiny_model(arch, seed=0)
    c, _ = tiny_model(arch, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    s1, s2, s3 = make(seed=0), make(seed=0), make(seed=1)
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)


@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if a != "dinov2"])
def test_samples_have_right_padding(arch):
    sample = sample_factory(arch)()
    mask = sample["decoder_attention_mask" if arch == "whisper" else "attention_mask"]
    assert mask.shape[0] == 2
    assert bool(mask[0].all()) and not bool(mask[1].all())
    # padding only at the end of a row
    for row in mask:
        n = int(row.sum())
        assert row[:n].all() and not row[n:].any()


def test_omni_sample_placeholders():
    from morphoquant.models.tiny import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN, audio_tokens

    s = sample_factory("qwen2.5-omni-thinker")(video=True)
    ids = s["input_ids"]
    assert int((ids == IMAGE_TOKEN).sum()) == int(s["image_grid_thw"].prod(-1).sum()) // 4
    assert int((ids == VIDEO_TOKEN).sum()) == int(s["video_grid_thw"].prod(-1).sum()) // 4
    lens = s["feature_attention_mask"].sum(-1).tolist()
    assert lens == [200, 160]
    assert int((ids == AUDIO_TOKEN).sum()) == sum(audio_tokens(n) for n in lens) == 90


def test_unknown_arch():
    with pytest.raises(ValueError, match="llama"):
        tiny_model("gpt-17")

import torch

from morphoquant.statistics import ChannelStats, Modality, ModalityStats
from morphoquant.statistics.dispersion import (
    Threshold,
    dispersion_score,
    global_threshold,
    modality_outlier_mask,
    outlier_mask,
)


def test_dispersion_hand_computed():
    st = ChannelStats(1)
    st.update(torch.tensor([[-1.0], [3.0]]))
    # (3 - (-1)) / log1p(mean|x| = 2 + 1e-5)
    expected = 4.0 / torch.log1p(torch.tensor(2.0 + 1e-5))
    torch.testing.assert_close(dispersion_score(st), expected.reshape(1))


def test_planted_50_sigma_spike_is_flagged():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[7, 13] = 50.0                        # a 50-sigma spike in channel 13
    st = ChannelStats(64)
    st.update(x)
    scores = dispersion_score(st)
    mask = outlier_mask(scores, Threshold.of(scores, 2.0), None)
    assert mask[13] and int(mask.sum()) <= 3


def test_global_threshold_flags_layer_that_is_uniformly_wide():
    # layer B's channels are all wide: no local outlier, but every channel exceeds the network-wide threshold
    def stats(scale):
        ms = ModalityStats(8)
        g = torch.Generator().manual_seed(1)
        ms.update(torch.randn(256, 8, generator=g) * scale, None)
        return ms
    layers = {f"a{i}": stats(1.0) for i in range(6)}
    layers["b"] = stats(1.0)
    layers["b"].all.max += 200.0
    g = global_threshold(layers, 2.0)
    mask, _, _ = modality_outlier_mask(layers["b"], 2.0, g)
    assert int(mask.sum()) == 8
    mask_local, _, _ = modality_outlier_mask(layers["b"], 2.0, None)
    assert int(mask_local.sum()) == 0


def test_per_modality_outlier_union():
    g = torch.Generator().manual_seed(0)
    ms = ModalityStats(32)
    text = torch.randn(2000, 32, generator=g)
    audio = torch.randn(40, 32, generator=g)
    audio[:, 5] *= 30                       # an outlier channel for audio tokens only
    ids = torch.cat([torch.zeros(2000), torch.full((40,), int(Modality.AUDIO))]).to(torch.int8)
    ms.update(torch.cat([text, audio]), ids)
    pooled, _, _ = modality_outlier_mask(ms, 3.0, None, per_modality=False)
    per_mod, _, detail = modality_outlier_mask(ms, 3.0, None, per_modality=True)
    assert per_mod[5] and detail["outliers_audio"] >= 1
    assert int(per_mod.sum()) >= int(pooled.sum())

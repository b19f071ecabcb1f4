import pytest
import torch

from morphoquant.statistics import (
    PAD,
    ActivationCollector,
    ChannelStats,
    Modality,
    ModalityStats,
    NonFiniteActivationError,
)


def test_channel_stats_hand_computed():
    st = ChannelStats(2)
    st.update(torch.tensor([[1.0, -2.0]]))
    st.update(torch.tensor([[3.0, 4.0]]))
    assert st.count == 2
    assert st.min.tolist() == [1.0, -2.0] and st.max.tolist() == [3.0, 4.0]
    assert st.mean_abs.tolist() == [2.0, 3.0]
    assert st.mean.tolist() == [2.0, 1.0]
    torch.testing.assert_close(st.rms, torch.tensor([5 ** 0.5, 10 ** 0.5]))
    torch.testing.assert_close(st.std, torch.tensor([1.0, 3.0]))
    # two-point distribution: kurtosis exactly 1
    torch.testing.assert_close(st.kurtosis, torch.tensor([1.0, 1.0]))


def test_gaussian_kurtosis_near_three_and_merge():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 3, generator=g)
    a, b = ChannelStats(3), ChannelStats(3)
    a.update(x[:7000])
    b.update(x[7000:])
    m = a.merge(b)
    assert m.count == 20000
    assert ((m.kurtosis - 3).abs() < 0.15).all()


def test_modality_split_excludes_padding():
    ms = ModalityStats(2, "layer")
    x = torch.tensor([[1.0, 1.0], [100.0, 100.0], [2.0, 2.0], [-5.0, 0.0]])
    ids = torch.tensor([Modality.TEXT, PAD, Modality.AUDIO, Modality.AUDIO], dtype=torch.int8)
    ms.update(x, ids)
    assert ms.count == 3                      # the padding row is not counted
    assert ms.all.max.tolist() == [2.0, 2.0]  # ... nor does it move the range
    assert ms["text"].count == 1 and ms["audio"].count == 2
    assert ms.modalities == ["text", "audio"]
    with pytest.raises(KeyError, match="no image tokens"):
        ms["image"]


def test_misaligned_rows_use_fallback():
    ms = ModalityStats(2)
    ms.update(torch.ones(5, 2), torch.zeros(3, dtype=torch.int8), fallback=Modality.AUDIO)
    assert ms["audio"].count == 5 and ms.count == 5


def test_nan_activation_raises_clear_error():
    ms = ModalityStats(2, "blk.0.q_proj")
    with pytest.raises(NonFiniteActivationError, match="blk.0.q_proj"):
        ms.update(torch.tensor([[1.0, float("nan")]]), None)


def test_collector_hooks_linears():
    lin = torch.nn.Linear(3, 2)
    col = ActivationCollector({"lin": lin})
    with col:
        col.current_ids = torch.tensor([[0, 3]], dtype=torch.int8)
        lin(torch.ones(1, 2, 3))
    lin(torch.ones(1, 2, 3))                  # hooks removed on exit
    assert col.stats["lin"].count == 2 and col.stats["lin"].modalities == ["text", "audio"]


def test_linears_sharing_an_input_share_statistics_once():
    a, b, c = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    col = ActivationCollector({"a": a, "b": b, "c": c})
    with col:
        for _ in range(2):
            col.new_forward()
            x = torch.randn(4, 3)
            c(a(x) + b(x))
    assert col.alias == {"b": "a"}
    assert col.stats["b"] is col.stats["a"] and col.stats["a"].count == 8
    assert col.stats["c"].count == 8

import math

import pytest
import torch
from torch import nn

from morphoquant.eval import PerplexityResult, evaluate_perplexity, perplexity


class UniformLM(nn.Module):
    """Constant logits: every next-token distribution is uniform over ``vocab`` tokens."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, self.vocab) + self.dummy


class TableLM(nn.Module):
    """Logits depend only on the current token: row ``x`` of a fixed table (a bigram model)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids):
        return (self.table[input_ids],)


def test_uniform_logits_give_vocab_size():
    windows = torch.randint(0, 50, (5, 9))
    res = evaluate_perplexity(UniformLM(50), windows, batch_size=2, progress=False)
    assert res.ppl == pytest.approx(50.0, rel=1e-6)
    assert res.tokens == 5 * 8 and res.tokens_per_window == 8
    assert torch.allclose(res.nll_per_window, torch.full((5,), math.log(50.0), dtype=torch.float64))
    assert perplexity(UniformLM(50), windows, progress=False) == pytest.approx(50.0, rel=1e-6)


def test_aggregation_is_token_weighted_not_mean_of_batch_means():
    torch.manual_seed(0)
    vocab = 7
    table = torch.randn(vocab, vocab) * 3
    model = TableLM(table)
    windows = torch.randint(0, vocab, (5, 6))
    # hand computation: sum of all next-token NLLs / number of scored tokens
    logp = torch.log_softmax(table.double(), -1)
    per_window = torch.stack([-logp[w[:-1], w[1:]].sum() for w in windows])
    expected = math.exp(float(per_window.sum()) / (5 * 5))
    # batch_size 4 leaves a final batch of 1: a mean of batch means would weigh that window 4x
    batch_means = [float(per_window[:4].sum() / 20), float(per_window[4:].sum() / 5)]
    wrong = math.exp(sum(batch_means) / 2)
    assert abs(wrong - expected) > 1e-3 * expected  # the two aggregations really differ here
    for bs in (1, 4, 5):
        res = evaluate_perplexity(model, windows, batch_size=bs, progress=False)
        assert res.ppl == pytest.approx(expected, rel=1e-5)
        assert torch.allclose(res.nll_per_window, per_window / 5, rtol=1e-5)


def test_tiny_llama_runs_and_restores_training_flag():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.train()
    windows = torch.randint(0, 128, (3, 16))
    res = evaluate_perplexity(model, windows, batch_size=2, progress=True)
    assert model.training
    assert math.isfinite(res.ppl) and 1.0 < res.ppl < 1000.0
    lo, hi = res.confidence_interval(0.95)
    assert lo <= res.ppl <= hi
    # matches HF's own loss on one window (mean NLL over the T-1 shifted positions)
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=windows[:1], labels=windows[:1]).loss
    assert float(res.nll_per_window[0]) == pytest.approx(float(loss), rel=1e-4)
    d = res.to_dict()
    assert d["windows"] == 3 and d["tokens"] == 45


def test_confidence_interval_single_window():
    res = PerplexityResult(ppl=math.e, nll_per_window=torch.tensor([1.0], dtype=torch.float64), tokens=3,
                           tokens_per_window=3)
    assert res.confidence_interval() == (pytest.approx(math.e), pytest.approx(math.e))


@pytest.mark.parametrize("windows, match", [
    (torch.zeros(0, 8, dtype=torch.long), "empty"),
    (torch.zeros(3, 1, dtype=torch.long), "at least 2 tokens"),
    (torch.zeros(8, dtype=torch.long), "2-D"),
    (torch.zeros(2, 4), "integer"),
])
def test_bad_windows_raise(windows, match):
    with pytest.raises(ValueError, match=match):
        perplexity(UniformLM(10), windows, progress=False)

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from morphoquant.eval import FidelityReport, output_fidelity
from morphoquant.statistics.modality import PAD, Modality


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _samples(n=2, batch=2, seq=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (batch, seq), generator=g)} for _ in range(n)]


def _mixed_ids(batch=2, seq=10):
    ids = torch.full((batch, seq), int(Modality.TEXT), dtype=torch.int8)
    ids[:, 2:6] = int(Modality.IMAGE)
    ids[0, -1] = PAD
    ids[1, -2:] = PAD
    return ids


def test_self_fidelity_is_perfect(tiny_llama):
    samples = _samples()
    ids = [_mixed_ids(), _mixed_ids()]
    rep = output_fidelity(tiny_llama, tiny_llama, samples, ids)
    assert isinstance(rep, FidelityReport)
    assert rep.modalities == ["all", "text", "image"]
    for m in rep.per_modality.values():
        assert m.cosine == pytest.approx(1.0, abs=1e-6)
        assert m.rel_error == pytest.approx(0.0, abs=1e-6)
        assert m.kl == pytest.approx(0.0, abs=1e-7)
    d = rep.to_dict()
    assert d["samples"] == 2 and set(d["per_modality"]["all"]) == {"tokens", "cosine", "rel_error", "kl"}


def test_modality_split_respects_ids_and_excludes_pad(tiny_llama):
    ids = [_mixed_ids(), _mixed_ids()]
    rep = output_fidelity(tiny_llama, tiny_llama, _samples(), ids)
    # per sample: image 2*4 = 8 tokens; pad 3 tokens; text 20 - 8 - 3 = 9 tokens
    assert rep["image"].tokens == 16
    assert rep["text"].tokens == 18
    assert rep["all"].tokens == 34
    assert "audio" not in rep.per_modality


def _perturbed(model, scale=0.05, only_text_rows=False):
    cand = copy.deepcopy(model)
    torch.manual_seed(123)
    with torch.no_grad():
        for p in cand.parameters():
            p.add_(scale * torch.randn_like(p) * p.std().clamp_min(1e-3))
    return cand


def test_perturbed_candidate_has_positive_kl(tiny_llama):
    cand = _perturbed(tiny_llama)
    rep = output_fidelity(tiny_llama, cand, _samples(), [_mixed_ids(), _mixed_ids()])
    for m in rep.per_modality.values():
        assert m.kl > 0
        assert m.rel_error > 0
        assert m.cosine < 1.0
    assert rep["all"].tokens == rep["text"].tokens + rep["image"].tokens


def test_metrics_match_hand_computation(tiny_llama):
    cand = _perturbed(tiny_llama, scale=0.2)
    sample = _samples(n=1, batch=1, seq=8)[0]
    ids = torch.tensor([[0, 0, 3, 3, 3, 0, PAD, PAD]], dtype=torch.int8)
    rep = output_fidelity(tiny_llama, cand, [sample], [ids])
    with torch.no_grad():
        a = tiny_llama(**sample, output_hidden_states=True)
        b = cand(**sample, output_hidden_states=True)
    hf, hq = a.hidden_states[-1][0].double(), b.hidden_states[-1][0].double()
    lp, lq = torch.log_softmax(a.logits[0].double(), -1), torch.log_softmax(b.logits[0].double(), -1)
    for name, pos in (("audio", [2, 3, 4]), ("text", [0, 1, 5]), ("all", [0, 1, 2, 3, 4, 5])):
        cos = torch.nn.functional.cosine_similarity(hf[pos], hq[pos], dim=-1).mean()
        rel = ((hq[pos] - hf[pos]).pow(2).sum() / hf[pos].pow(2).sum()).sqrt()
        kl = (lp[pos].exp() * (lp[pos] - lq[pos])).sum(-1).mean()
        assert rep[name].tokens == len(pos)
        assert rep[name].cosine == pytest.approx(float(cos), abs=1e-5)
        assert rep[name].rel_error == pytest.approx(float(rel), rel=1e-4)
        assert rep[name].kl == pytest.approx(float(kl), rel=1e-3, abs=1e-7)


def test_one_dim_ids_accepted_for_batch_one(tiny_llama):
    sample = _samples(n=1, batch=1, seq=6)[0]
    rep = output_fidelity(tiny_llama, tiny_llama, [sample], [torch.zeros(6, dtype=torch.int8)])
    assert rep.modalities == ["all", "text"] and rep["text"].tokens == 6


def test_length_mismatch_raises(tiny_llama):
    with pytest.raises(ValueError, match="2 samples but 1 modality_ids"):
        output_fidelity(tiny_llama, tiny_llama, _samples(), [_mixed_ids()])


def test_ids_shape_mismatch_raises(tiny_llama):
    with pytest.raises(ValueError, match=r"modality_ids has shape \(2, 9\).*\(2, 10\)"):
        output_fidelity(tiny_llama, tiny_llama, _samples(n=1), [torch.zeros(2, 9, dtype=torch.int8)])


def test_unknown_ids_raise(tiny_llama):
    ids = _mixed_ids()
    ids[0, 0] = 7
    with pytest.raises(ValueError, match="unknown values"):
        output_fidelity(tiny_llama, tiny_llama, _samples(n=1), [ids])


def test_missing_hidden_states_gives_clear_error():
    class NoHidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, output_hidden_states=False, return_dict=True):
            from transformers.modeling_outputs import Seq2SeqLMOutput
            h = self.lin(x)
            return Seq2SeqLMOutput(logits=h, decoder_hidden_states=(h,))

    m = NoHidden()
    sample = {"x": torch.randn(1, 3, 4)}
    with pytest.raises(ValueError, match="no `hidden_states`.*decoder_hidden_states.*hidden_states_fn"):
        output_fidelity(m, m, [sample], [torch.zeros(1, 3, dtype=torch.int8)])
    rep = output_fidelity(m, m, [sample], [torch.zeros(1, 3, dtype=torch.int8)],
                          hidden_states_fn=lambda out: out.decoder_hidden_states[-1])
    assert rep["all"].cosine == pytest.approx(1.0, abs=1e-6)


def test_kl_from_logprobs_matches_hand_computed_value():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)
    import math

    from morphoquant.eval.fidelity import kl_from_logprobs
    lp = torch.tensor([[0.5, 0.5]], dtype=torch.float64).log()
    lq = torch.tensor([[0.25, 0.75]], dtype=torch.float64).log()
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert abs(float(kl_from_logprobs(lp, lq)[0]) - expected) < 1e-15
    assert float(kl_from_logprobs(lp, lp)[0]) == 0.0

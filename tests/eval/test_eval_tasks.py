"""task_for: the built-in task of each model kind, sized by the CLI's --eval-size (passed as eval_windows)."""
import pytest
from torch import nn

from morphoquant.eval.tasks import SpeechASRTask, TaskError, TextLMTask, VisionTask, task_for


def _named(name):
    return type(name, (nn.Module,), {})()


@pytest.mark.parametrize("name, cls", [("LlamaForCausalLM", TextLMTask),
                                       ("WhisperForConditionalGeneration", SpeechASRTask),
                                       ("Dinov2Model", VisionTask)])
def test_eval_size_reaches_every_task(name, cls):
    task = task_for(_named(name), processor=None, eval_windows=5, seq_len=64)
    assert isinstance(task, cls) and task.eval_size == 5


def test_defaults_without_a_size():
    assert task_for(_named("WhisperForConditionalGeneration"), None).eval_size == 16
    assert task_for(_named("Dinov2Model"), None).eval_size == 8


def test_task_specific_size_wins():
    assert task_for(_named("WhisperForConditionalGeneration"), None, eval_windows=5, eval_sentences=7).eval_size == 7


def test_unknown_model_is_a_clear_error():
    with pytest.raises(TaskError, match="no built-in calibration/evaluation task for BertModel"):
        task_for(_named("BertModel"), None)


def test_text_task_reports_every_windows_nll(monkeypatch):
    """The perplexity is exp of the mean of the per-window NLLs it reports (for paired comparisons)."""
    import math

    import torch

    from morphoquant import data
    from morphoquant.models.tiny import tiny_model
    model, _ = tiny_model("llama")
    vocab = model.config.vocab_size
    windows = torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(data, "evaluation_windows", lambda tok, seq_len, n: windows[:n])
    m = TextLMTask(None, eval_windows=3, seq_len=16, batch=2).evaluate(model)
    nll = m["wiki_nll_per_window"]
    assert len(nll) == 3 and len(set(nll)) == 3
    assert math.isclose(math.exp(sum(nll) / 3), m["wiki_ppl"], rel_tol=1e-9)

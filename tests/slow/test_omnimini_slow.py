"""The real OmniMini (run with ``pytest -m slow``; about two minutes on one CPU thread)."""
import time

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def omnimini():
    from morphoquant.eval.omnimini import OmniMiniTask
    from morphoquant.zoo import load_model
    t = time.time()
    model, proc = load_model("omnimini")
    seconds = time.time() - t
    return model, proc, OmniMiniTask(proc, sizes={"image_qa": 24, "spoken_qa": 16, "asr": 4, "wiki_windows": 1}), \
        seconds


def test_loads_in_seconds_with_frozen_unmodified_parts(omnimini):
    from morphoquant.zoo import load_model
    model, proc, _, seconds = omnimini
    assert seconds < 120
    lm, tok = load_model("smollm2-135m")
    ids = tok("The capital of France is Paris, and the capital of Italy", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, lm(input_ids=ids).logits, atol=0, rtol=0)
    trained = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in
                  ("image_projector", "audio_projector", "extra_embeddings"))
    assert trained < 3_000_000


def test_fp_scores_are_far_above_chance(omnimini):
    model, _, task, _ = omnimini
    m = task.evaluate(model)
    # chance: always "yes" is ~37 % on easy-VQA test questions (75 % yes/no, 25 % colour/shape)
    assert m["vqa_acc"] >= 0.7, m
    assert m["spoken_vqa_acc"] >= 0.6, m
    assert m["asr_wer"] < 0.9, m
    assert 5 < m["wiki_ppl"] < 40, m


def test_calibration_mix_has_every_modality(omnimini):
    from morphoquant.models import get_adapter
    from morphoquant.statistics.modality import Modality
    model, _, task, _ = omnimini
    samples = task.calibration_samples(4, 64)
    adapter = get_adapter(model)
    seen = set()
    for s in samples:
        ids = adapter.decoder_modality_ids(s)
        seen |= {m for m in Modality if bool((ids == int(m)).any())}
    assert seen == {Modality.TEXT, Modality.IMAGE, Modality.AUDIO}

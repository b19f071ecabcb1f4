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
    model, _, _, seconds = omnimini
    assert seconds < 120
    lm, tok = load_model("smollm2-135m")
    ids = tok("The capital of France is Paris, and the capital of Italy", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, lm(input_ids=ids).logits, atol=0, rtol=0)
    trained = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in
                  ("image_projector", "audio_projector", "extra_embeddings"))
    assert trained < 3_100_000


def test_fp_scores_are_far_above_chance(omnimini):
    model, _, task, _ = omnimini
    m = task.evaluate(model)
    # chance with answer-type scoring: 0.75 x 1/2 + 0.125 x 1/8 + 0.125 x 1/3 = 0.43 on easy-VQA test questions;
    # the committed weights give 0.52 (image QA, 64 items) and 0.71 (spoken QA, 48 items), see docs/omnimini.md
    together = (m["vqa_acc"] * m["vqa_acc_n"] + m["spoken_vqa_acc"] * m["spoken_vqa_acc_n"]) / \
        (m["vqa_acc_n"] + m["spoken_vqa_acc_n"])
    assert together >= 0.5, m
    assert m["asr_wer"] < 3, m          # transcription does not work yet (WER 1.33 on 24 items): sanity only
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

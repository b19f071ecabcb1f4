"""OmniMiniTask on tiny random parts: calibration restricted by modality, evaluation sizes from ``--eval-size``,
the per-task table columns. Data loaders are replaced by tiny fakes (no easy-VQA, no espeak-ng): milliseconds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import morphoquant.data as data_module
import morphoquant.data.omnimini as omni_data
from morphoquant.data.omnimini import OmniExample
from morphoquant.eval.omnimini import (
    DEFAULT_SIZES,
    OmniMiniTask,
    calib_kinds_for_modalities,
    sizes_for_eval_size,
)
from morphoquant.eval.tasks import task_for
from morphoquant.models.tiny import tiny_omnimini


class FakeSpeech:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def waveform(self) -> np.ndarray:
        return (np.random.default_rng(0).standard_normal(int(self.seconds * 16000)) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def omni():
    return tiny_omnimini(layers=1)


@pytest.fixture
def fake_calibration_data(monkeypatch, tmp_path):
    """Tiny stand-ins for the calibration documents (one per kind, like the real ones) and text windows."""
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img)
    asked = {}

    def examples(n, seed=0, kinds=()):
        asked["kinds"] = tuple(kinds)
        docs = {"image_qa": OmniExample("image_qa", (("<image>\nQ:", False), (" red\n", True)), (img,)),
                "spoken_qa": OmniExample("spoken_qa", (("<image>\nQ: <audio>\nA:", False), (" no\n", True)),
                                         (img,), (FakeSpeech(0.5),)),
                "asr": OmniExample("asr", (("<audio>\nT:", False), (" hi\n", True)), (), (FakeSpeech(0.5),))}
        return [docs[kinds[i % len(kinds)]] for i in range(n)]

    monkeypatch.setattr(omni_data, "calibration_examples", examples)
    monkeypatch.setattr(data_module, "calibration_windows",
                        lambda tok, n, seq_len, seed=0: torch.randint(1, 100, (n, seq_len)))
    return asked


def _modalities(sample, cfg) -> set[str]:
    ids = set(sample["input_ids"].flatten().tolist())
    return {"text"} | ({"image"} if cfg.image_token_id in ids else set()) | \
        ({"audio"} if cfg.audio_token_id in ids else set())


@pytest.mark.parametrize("modalities, kinds", [
    (["image", "audio", "text"], ("image_qa", "spoken_qa", "asr", "text")),
    (["image", "text"], ("image_qa", "text")),                 # without audio: spoken QA has audio too
    (["audio", "text"], ("asr", "text")),                      # without image: spoken QA has an image
    (["text"], ("text",)),
    ([" Text ", "IMAGE"], ("image_qa", "text")),               # names are trimmed and case-insensitive
])
def test_calibration_kinds_for_modalities(modalities, kinds):
    assert calib_kinds_for_modalities(modalities) == kinds


@pytest.mark.parametrize("modalities, match", [
    ([], "non-empty subset"), (["video"], "non-empty subset"), (["image", "audio"], "add text"),
])
def test_impossible_calibration_modalities_are_clear_errors(modalities, match):
    with pytest.raises(ValueError, match=match):
        calib_kinds_for_modalities(modalities)


def test_restricted_calibration_samples_hold_only_those_modalities(omni, fake_calibration_data):
    model, proc = omni
    cfg = model.omni_config
    task = OmniMiniTask(proc)
    full = task.calibration_samples(8, 16)
    assert [sorted(_modalities(s, cfg)) for s in full[:4]] == [["image", "text"], ["audio", "image", "text"],
                                                               ["audio", "text"], ["text"]]
    assert task.restrict_calibration_modalities(["audio", "text"]) == ("asr", "text")
    samples = task.calibration_samples(6, 16)
    assert fake_calibration_data["kinds"] == ("asr",)
    assert [sorted(_modalities(s, cfg)) for s in samples] == [["audio", "text"], ["text"]] * 3
    assert task.describe()["calib_modalities"] == ["audio", "text"]
    task.restrict_calibration_modalities(["text"])
    assert all(_modalities(s, cfg) == {"text"} and s["input_ids"].shape == (1, 16)
               for s in task.calibration_samples(3, 16))
    with torch.no_grad():                       # the samples are model inputs
        model(**samples[0])


def test_eval_size_scales_all_tasks():
    assert sizes_for_eval_size(64) == DEFAULT_SIZES
    # 16 image QA; 16·48/64 = 12 spoken; 16·24/64 = 6 transcriptions; 16·4/64 = 1 window
    assert sizes_for_eval_size(16) == {"image_qa": 16, "spoken_qa": 12, "asr": 6, "wiki_windows": 1}
    assert sizes_for_eval_size(1) == {"image_qa": 1, "spoken_qa": 1, "asr": 1, "wiki_windows": 1}
    with pytest.raises(ValueError, match="at least 1"):
        sizes_for_eval_size(0)


def test_task_for_passes_the_eval_size(omni):
    model, proc = omni
    task = task_for(model, proc, eval_windows=32, seq_len=512)
    assert isinstance(task, OmniMiniTask)
    assert task.sizes == {"image_qa": 32, "spoken_qa": 24, "asr": 12, "wiki_windows": 2}
    assert task_for(model, proc).sizes == DEFAULT_SIZES
    # explicit sizes still win over the scaled ones
    assert OmniMiniTask(proc, sizes={"asr": 2}, eval_size=16).sizes["asr"] == 2
    assert task.table_metrics[:4] == ("vqa_acc", "spoken_vqa_acc", "asr_wer", "wiki_ppl")
    assert task.table_metrics[4:] == ("kl_text", "kl_image", "kl_audio")


def test_modality_kl_is_zero_against_itself_and_causal(omni):
    """KL(reference || model) per modality: 0 for the model itself; perturbing the audio projector leaves the
    image rows (all before the audio) exactly unchanged and moves the audio rows."""
    import copy

    model, proc = omni
    cfg = model.omni_config
    task = OmniMiniTask(proc, sizes={"spoken_qa": 1})
    s = proc("<image>Q:<audio>A:", images=[np.zeros((64, 64, 3), np.uint8)], audios=[FakeSpeech(0.5).waveform()])
    task._cache["spoken_qa"] = [(None, s)]
    same = task.modality_kl(model, model)
    assert same["kl_text"] == same["kl_image"] == same["kl_audio"] == 0.0
    # rows: 4 image, ceil(ceil(50 / 2) / 4) = 7 audio, the rest text (markers and "Q:", "A:")
    n = s["input_ids"].shape[1]
    assert (same["kl_image_rows"], same["kl_audio_rows"], same["kl_text_rows"]) == (4, 7, n - 11)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.audio_projector.fc2.weight.mul_(3.0)
    kl = task.modality_kl(other, model)
    assert kl["kl_image"] == 0.0 and kl["kl_audio"] > 0 and kl["kl_text"] > 0
    with torch.no_grad():               # the audio rows' mean, computed directly
        p = torch.log_softmax(model(**s).logits[0].double(), -1)
        q = torch.log_softmax(other(**s).logits[0].double(), -1)
    rows = s["input_ids"][0] == cfg.audio_token_id
    want = torch.nn.functional.kl_div(q[rows], p[rows], log_target=True, reduction="sum") / int(rows.sum())
    assert abs(kl["kl_audio"] - float(want)) < 1e-9


def _spoken_task(proc, answers=("yes", "red")):
    """A task whose spoken-QA items are tiny image + audio + text prompts (no other task)."""
    task = OmniMiniTask(proc, sizes={"image_qa": 0, "spoken_qa": len(answers), "asr": 0, "wiki_windows": 0})
    items = []
    for i, a in enumerate(answers):
        s = proc("<image>Q:<audio>A:" + "x" * i, images=[np.zeros((64, 64, 3), np.uint8)],
                 audios=[FakeSpeech(0.5).waveform()])
        items.append((OmniExample("spoken_qa", (("<image>\nQ: <audio>\nA:", False),), answer=a), s))
    task._cache["spoken_qa"] = items
    return task


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_evaluate_with_reference_runs_each_model_once_per_prompt_and_caches_the_reference(omni):
    """One forward of the evaluated model per spoken-QA prompt (KL and answer scoring share it: multi-token
    candidates add cached continuation steps only), the reference's log-probs computed once across evaluated
    models, and the same numbers as the separate, uncached computations."""
    import copy

    model, proc = omni
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.audio_projector.fc2.weight.mul_(2.0)
    task = _spoken_task(proc)
    ref_calls, h_ref = _count_forwards(model)
    got = task.evaluate(other, reference=model)
    again = task.evaluate(other, reference=model)
    h_ref.remove()
    assert len(ref_calls) == 2                               # 2 prompts, once: the second evaluate used the cache
    assert got == {**again, "kl_seconds": got["kl_seconds"], "spoken_vqa_acc_seconds": got["spoken_vqa_acc_seconds"]}

    plain = _spoken_task(proc)
    plain.kl_cache_mb = 0.0                                  # nothing cached: the reference re-runs every time
    want = plain.modality_kl(other, model)
    want_acc = plain.evaluate_kind(other, "spoken_qa")["spoken_vqa_acc"]
    for m in ("text", "image", "audio"):
        assert abs(got[f"kl_{m}"] - want[f"kl_{m}"]) < 1e-9 and got[f"kl_{m}_rows"] == want[f"kl_{m}_rows"]
    assert got["spoken_vqa_acc"] == want_acc
    assert "reference_logits" not in plain._cache or not plain._cache["reference_logits"][2]


def test_reference_cache_is_dropped_when_the_reference_changes(omni):
    """An in-place edit of the reference's weights (or another reference model) invalidates the cache."""
    import copy

    model, proc = omni
    ref = copy.deepcopy(model)
    task = _spoken_task(proc, answers=("no",))
    assert task.modality_kl(model, ref)["kl_audio"] == 0.0
    with torch.no_grad():
        ref.audio_projector.fc2.weight.mul_(3.0)            # in place: same tensors, new version
    assert task.modality_kl(model, ref)["kl_audio"] > 0
    assert task.modality_kl(model, model)["kl_audio"] == 0.0  # another reference object


def test_task_description_names_the_projectors(omni):
    # compare reuses a finished row only when the task description matches: retrained projectors must not
    # inherit the rows of the old ones
    import copy

    from morphoquant.models.omnimini import projector_digest
    model, proc = omni
    first = task_for(model, proc).describe()
    assert first["projectors_sha256"] == projector_digest(model)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if n.startswith("audio_projector")).add_(1e-3)
    assert task_for(other, proc).describe()["projectors_sha256"] != first["projectors_sha256"]
    # the decoder's own weights are not part of it (they are the zoo's, unmodified)
    again = copy.deepcopy(model)
    with torch.no_grad():
        next(p for n, p in again.named_parameters() if n.startswith("language_model")).add_(1.0)
    assert task_for(again, proc).describe() == first

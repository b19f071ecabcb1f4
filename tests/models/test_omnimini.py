"""OmniMini mechanics on tiny random parts (milliseconds): placeholder expansion, modality masks, pooling and
stacking, projector shapes, text-only equivalence with the decoder, save/load, candidate scoring."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from morphoquant.models import get_adapter
from morphoquant.models.omnimini import (
    OmniMiniAdapter,
    OmniMiniError,
    OmniMiniForConditionalGeneration,
    load_projectors,
    pool_patches,
    save_projectors,
    stack_frames,
)
from morphoquant.models.tiny import OMNIMINI_VOCAB, tiny_omnimini
from morphoquant.statistics.modality import PAD, Modality

V = OMNIMINI_VOCAB


@pytest.fixture(scope="module")
def omni():
    return tiny_omnimini(layers=2, tower_layers=2)


def wave(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)


def test_placeholder_expansion_counts_and_order(omni):
    model, proc = omni
    cfg = model.omni_config
    s = proc("<image>Q:<audio>A:", images=[image()], audios=[wave(1.0)])
    ids = s["input_ids"][0].tolist()
    # 56 px / 14 = 4x4 patches pooled 2x2 -> 4 image tokens; 1 s = 100 mel frames -> 50 frames -> 13 tokens
    assert cfg.image_tokens == 4 and cfg.audio_tokens(100) == 13
    assert ids[:6] == [cfg.image_start_id] + [cfg.image_token_id] * 4 + [cfg.image_end_id]
    a = ids.index(cfg.audio_start_id)
    assert ids[a + 1:a + 14] == [cfg.audio_token_id] * 13 and ids[a + 14] == cfg.audio_end_id
    assert s["pixel_values"].shape == (1, 3, 56, 56)
    assert s["input_features"].shape == (1, 80, 100) and s["feature_attention_mask"].sum() == 100


def test_marker_count_mismatch_is_a_clear_error(omni):
    _, proc = omni
    with pytest.raises(OmniMiniError, match="2 <image>"):
        proc("<image> two? <image>", images=[image()])


def test_decoder_modality_ids_and_padding(omni):
    model, proc = omni
    adapter = get_adapter(model)
    assert isinstance(adapter, OmniMiniAdapter)
    s = proc("<image>Q:<audio>A:", images=[image()], audios=[wave(1.0)])
    s["attention_mask"][0, -1] = 0
    ids = adapter.decoder_modality_ids(s)[0]
    assert int((ids == Modality.IMAGE).sum()) == 4
    assert int((ids == Modality.AUDIO).sum()) == 13
    assert int(ids[-1]) == PAD
    assert int((ids == Modality.TEXT).sum()) == ids.numel() - 4 - 13 - 1   # markers and text


def test_stacks_rows_match_hidden_states(omni):
    """The ids of every stack have one entry per token row of the hidden states entering its blocks."""
    model, proc = omni
    adapter = get_adapter(model)
    stacks = {s.name: s for s in adapter.stacks()}
    assert {n: s.default_enabled for n, s in stacks.items()} == {"vision": False, "audio": False, "text": True}
    # two clips of different length in one sample: the shorter one's tail rows are PAD
    s = proc("<image><audio><audio>", images=[image()], audios=[wave(1.0), wave(0.5, 1)])
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, args[0].shape)
        return hook

    hooks = [st.blocks[0].register_forward_pre_hook(record(name)) for name, st in stacks.items()]
    with torch.no_grad():
        model(**s)
    for h in hooks:
        h.remove()
    for name, st in stacks.items():
        ids = st.modality_ids(s, seen[name])
        assert ids.shape == seen[name][:-1]
    audio_ids = stacks["audio"].modality_ids(s, seen["audio"])
    assert int((audio_ids == Modality.AUDIO).sum()) == 50 + 25 and int((audio_ids == PAD).sum()) == 25
    assert "language_model.lm_head" in adapter.protected_module_names()
    assert "image_projector.fc1" in adapter.protected_module_names()


def test_pool_patches_and_stack_frames_by_hand():
    h = torch.arange(1 + 16, dtype=torch.float32).reshape(1, 17, 1)    # CLS = 0, patches 1..16 row-major
    pooled = pool_patches(h, 4, 2)[0, :, 0]
    assert pooled.tolist() == [(1 + 2 + 5 + 6) / 4, (3 + 4 + 7 + 8) / 4, (9 + 10 + 13 + 14) / 4,
                               (11 + 12 + 15 + 16) / 4]
    f = torch.arange(5, dtype=torch.float32).reshape(5, 1)
    assert stack_frames(f, 4).tolist() == [[0, 1, 2, 3], [4, 4, 4, 4]]


def test_projector_shapes_and_embedding_scatter(omni):
    model, proc = omni
    s = proc("<image>x<audio>", images=[image()], audios=[wave(0.3)])
    feats = model.encode_images(s["pixel_values"])
    assert feats.shape == (1, 4, 32)
    frames = model.encode_audio(s["input_features"], s["feature_attention_mask"])
    assert frames[0].shape == (15, 32)                                  # 30 mel frames -> 15
    emb = model.embed(s["input_ids"], s["pixel_values"], s["input_features"], s["feature_attention_mask"])
    img_rows = s["input_ids"][0] == model.omni_config.image_token_id
    torch.testing.assert_close(emb[0, img_rows], model.project_images(feats)[0])
    with pytest.raises(OmniMiniError, match="placeholder"):
        model.embed(s["input_ids"], image_features=torch.zeros(2, 4, 32), audio_features=frames)


def test_batched_audio_equals_clips_alone(omni):
    model, proc = omni
    a, b = proc.log_mels(wave(0.61)), proc.log_mels(wave(0.4, 2))      # odd and even lengths
    feats = torch.zeros(2, 80, a.shape[-1])
    feats[0], feats[1, :, : b.shape[-1]] = a, b
    mask = torch.zeros(2, a.shape[-1], dtype=torch.long)
    mask[0], mask[1, : b.shape[-1]] = 1, 1
    with torch.no_grad():
        both = model.encode_audio(feats, mask)
        alone = [model.encode_audio(x[None])[0] for x in (a, b)]
    for x, y in zip(both, alone):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_text_only_logits_are_the_decoders(omni):
    model, _ = omni
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, model.language_model(input_ids=ids).logits,
                                   atol=0, rtol=0)


def test_save_load_round_trip(omni, tmp_path):
    model, _ = omni
    path = save_projectors(model, tmp_path / "p.safetensors", fp16=False, metadata={"note": "x"})
    tensors, cfg = load_projectors(path)
    assert cfg == model.omni_config
    for k, v in model.trained_state_dict().items():
        assert torch.equal(tensors[k], v)
    again = OmniMiniForConditionalGeneration.from_parts(model.language_model, model.vision_tower,
                                                        model.audio_tower, path)
    for k, v in model.trained_state_dict().items():
        assert torch.equal(again.trained_state_dict()[k], v)
    half, _ = load_projectors(save_projectors(model, tmp_path / "h.safetensors"))
    w = model.image_projector.fc1.weight
    assert torch.equal(half["image_projector.fc1.weight"], w.half().float())
    with pytest.raises(OmniMiniError, match="does not exist"):
        load_projectors(tmp_path / "missing.safetensors")


def test_candidate_scoring_matches_full_forwards(omni):
    """The cached scoring of multi-token candidates equals scoring each full sequence without a cache."""
    from morphoquant.eval.omnimini import OmniMiniTask

    model, proc = omni
    task = OmniMiniTask(proc)
    cands = ["red", "no", "teal"]
    task._cache["candidates"] = [(a, proc.tokenizer(" " + a).input_ids) for a in cands]
    s = proc("<image>Q: what?\nAnswer:", images=[image(3)])
    scores = {}
    with torch.no_grad():
        for a, ids in task._cache["candidates"]:
            full = {**s, "input_ids": torch.cat([s["input_ids"], torch.tensor([ids])], 1)}
            full["attention_mask"] = torch.ones_like(full["input_ids"])
            lp = torch.log_softmax(model(**full).logits[0].float(), -1)
            n = s["input_ids"].shape[1]
            scores[a] = sum(float(lp[n - 1 + j, t]) for j, t in enumerate(ids))
    assert task.choose_answer(model, s) == max(scores, key=scores.get)


def test_transcribe_stops_at_the_token_limit(omni):
    from morphoquant.eval.omnimini import OmniMiniTask

    model, proc = omni
    task = OmniMiniTask(proc)
    s = proc("<audio>\nTranscript:", audios=[wave(0.5)])
    text = task.transcribe(model, s, max_new_tokens=5)
    assert isinstance(text, str) and len(text) <= 5


def test_unknown_task_sizes_and_kinds_are_errors(omni):
    from morphoquant.eval.omnimini import OmniMiniTask

    _, proc = omni
    with pytest.raises(ValueError, match="sizes"):
        OmniMiniTask(proc, sizes={"vqa": 3})
    with pytest.raises(ValueError, match="subset"):
        OmniMiniTask(proc, calib_kinds=("video",))
    assert math.isclose(OmniMiniTask(proc).sizes["image_qa"], 64)


def test_answer_type_candidates():
    from morphoquant.data.omnimini import answer_type_candidates
    assert answer_type_candidates("no") == ("yes", "no")
    assert "teal" in answer_type_candidates("red") and len(answer_type_candidates("red")) == 8
    assert answer_type_candidates("circle") == ("circle", "rectangle", "triangle")
    with pytest.raises(ValueError, match="not an easy-VQA answer"):
        answer_type_candidates("maybe")


def test_residual_stream_writers_cover_every_non_decoder_row(omni):
    """Rows of the decoder stream come from the decoder's table, the extra embeddings and the two projectors:
    the declared writers (for a rotation of the stream) are exactly those, all as wide as the stream."""
    model, _ = omni
    embeds, linears = model.residual_stream_writers()
    assert embeds == [model.extra_embeddings] and linears == ["image_projector.fc2", "audio_projector.fc2"]
    assert all(model.get_submodule(n).out_features == model.omni_config.text_hidden for n in linears)
    assert model.get_output_embeddings() is model.language_model.lm_head
    assert model.get_input_embeddings() is model.language_model.get_input_embeddings()

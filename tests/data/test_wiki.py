"""Wikipedia splits and windows on a synthetic summaries file (no network)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from morphoquant.data import DataError, wiki


class CharTokenizer:
    """A stand-in tokenizer: one token per character (its code point)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, text, add_special_tokens=True, verbose=True):
        self.calls += 1
        return {"input_ids": [ord(c) for c in text]}


@pytest.fixture
def wiki_file(tmp_path):
    keys = [f"Article {i:05d}" for i in range(2600)]
    random.Random(0).shuffle(keys)  # the file's order must not matter
    data = {k: {"title": k, "extract": f"Text of {k}. " * 3, "description": "", "topic": "x"} for k in keys}
    path = tmp_path / "summaries_en-us.json"
    path.write_text(json.dumps(data))
    return path


def test_splits_fixed_disjoint_and_sorted(wiki_file):
    keys = wiki.split_keys(wiki_file)
    assert len(keys["calibration"]) == 2000 and len(keys["evaluation"]) == 400
    assert not set(keys["calibration"]) & set(keys["evaluation"])
    assert keys["calibration"][0] == "Article 00000" and keys["calibration"][-1] == "Article 01999"
    assert keys["evaluation"][0] == "Article 02200" and keys["evaluation"][-1] == "Article 02599"
    texts = wiki.wiki_texts("evaluation", wiki_file)
    assert texts[0].startswith("Text of Article 02200.") and len(texts) == 400
    assert wiki.wiki_text("calibration", wiki_file).count("\n\n") == 1999


def test_too_few_articles(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps({f"k{i}": {"extract": "x"} for i in range(2399)}))
    with pytest.raises(DataError, match="at least 2400"):
        wiki.split_keys(path)


def test_bad_split_and_bad_files(tmp_path, wiki_file):
    with pytest.raises(DataError, match="unknown Wikipedia split"):
        wiki.wiki_texts("test", wiki_file)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        wiki.wiki_texts("calibration", bad)
    with pytest.raises(DataError, match="does not exist"):
        wiki.wiki_texts("calibration", tmp_path / "missing.json")


def test_calibration_windows_deterministic(wiki_file):
    tok = CharTokenizer()
    a = wiki.calibration_windows(tok, 8, 64, seed=0, path=wiki_file)
    b = wiki.calibration_windows(tok, 8, 64, seed=0, path=wiki_file)
    c = wiki.calibration_windows(tok, 8, 64, seed=1, path=wiki_file)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert tok.calls == 1  # tokenization cached per tokenizer
    stream = wiki.wiki_tokens(tok, "calibration", wiki_file).tolist()
    text = "".join(map(chr, stream))
    for row in a:  # every window is a contiguous slice of the calibration stream
        assert "".join(map(chr, row.tolist())) in text
    # ...and never of the evaluation text
    assert all("Article 022" not in "".join(map(chr, r.tolist())) for r in a)


def test_evaluation_windows_consecutive(wiki_file):
    tok = CharTokenizer()
    ids = wiki.wiki_tokens(tok, "evaluation", wiki_file)
    w = wiki.evaluation_windows(tok, 100, path=wiki_file)
    assert w.shape == (ids.numel() // 100, 100)
    assert torch.equal(w.reshape(-1), ids[: w.numel()])
    w3 = wiki.evaluation_windows(tok, 100, max_windows=3, path=wiki_file)
    assert torch.equal(w3, w[:3])


def test_window_errors(wiki_file):
    tok = CharTokenizer()
    with pytest.raises(DataError, match="fewer than seq_len"):
        wiki.evaluation_windows(tok, 10**8, path=wiki_file)
    with pytest.raises(DataError, match="positive"):
        wiki.calibration_windows(tok, 0, 16, path=wiki_file)

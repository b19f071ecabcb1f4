"""easy-VQA loader on a synthetic data directory laid out like the package's (no network)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from morphoquant.data import DataError, vqa


@pytest.fixture
def root(tmp_path):
    (tmp_path / "answers.txt").write_text("circle\nred\nyes\nno\n")
    for split, n in (("train", 3), ("test", 2)):
        (tmp_path / split / "images").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (64, 64), (200, 0, 0)).save(tmp_path / split / "images" / f"{i}.png")
        rows = [["what shape is it?", "circle", i] for i in range(n)] + [["is it red?", "yes", 0]]
        (tmp_path / split / "questions.json").write_text(json.dumps(rows))
    return tmp_path


def test_splits_and_vocab(root):
    assert vqa.answer_vocab(root) == ["circle", "red", "yes", "no"]
    train = vqa.vqa_split("train", root)
    assert len(train) == 4 and len(vqa.vqa_split("test", root)) == 3
    s = train[-1]
    assert (s.question, s.answer, s.image_id) == ("is it red?", "yes", 0)
    assert s.image().size == (64, 64)
    assert len(vqa.vqa_split("train", root, limit=2)) == 2


def test_errors(root, tmp_path_factory):
    with pytest.raises(DataError, match="unknown easy-VQA split"):
        vqa.vqa_split("val", root)
    other = tmp_path_factory.mktemp("bad")
    with pytest.raises(DataError, match="no answers.txt"):
        vqa.vqa_split("train", other)
    (root / "test" / "images" / "1.png").unlink()
    with pytest.raises(DataError, match="1.png"):
        vqa.vqa_split("test", root)
    (root / "train" / "images" / "2.png").write_bytes(b"\x89PNG broken")
    sample = next(s for s in vqa.vqa_split("train", root) if s.image_id == 2)
    with pytest.raises(DataError, match="2.png"):
        sample.image()

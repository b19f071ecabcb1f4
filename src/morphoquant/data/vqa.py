"""easy-VQA: a small offline visual-question-answering set (MIT licence, PyPI package ``easy-vqa``).

4,000 train and 1,000 test synthetic 64×64 PNG images of one coloured shape each, with ~48k questions about
shape, colour and presence ("what color is the shape?", "is there a triangle?") and a 13-word answer
vocabulary.
The package is fetched with ``pip --no-deps`` into the MorphoQuant cache; only its data files are used.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import DataError
from .images import load_image

__all__ = [
    "EASY_VQA_PACKAGE",
    "EASY_VQA_VERSION",
    "VQA_SPLITS",
    "VQASample",
    "answer_vocab",
    "easy_vqa_root",
    "vqa_split",
]

EASY_VQA_PACKAGE = "easy-vqa"
EASY_VQA_VERSION = "1.0"
VQA_SPLITS = ("train", "test")


@dataclass(frozen=True)
class VQASample:
    """One question about one image."""

    image_path: Path
    question: str
    answer: str
    image_id: int

    def image(self, mode: str = "RGB") -> Image.Image:
        """The image as a PIL image (a corrupt file raises DataError naming it)."""
        return load_image(self.image_path, mode)


def easy_vqa_root(root: Path | str | None = None) -> Path:
    """The easy-VQA data directory (holding ``answers.txt``, ``train/``, ``test/``): ``root`` if given, else
    the one inside the fetched ``easy-vqa`` package."""
    if root is not None:
        root = Path(root)
    else:
        from ..zoo.fetch import fetch_package, package_files

        pkg = fetch_package(EASY_VQA_PACKAGE, EASY_VQA_VERSION)
        hits = package_files(pkg, "answers.txt")
        if not hits:
            raise DataError(
                f"package {EASY_VQA_PACKAGE} in {pkg} has no answers.txt; delete {pkg} so that it is "
                "fetched again"
            )
        root = hits[0].parent
    if not (root / "answers.txt").is_file():
        raise DataError(f"{root} is not an easy-VQA data directory (no answers.txt)")
    return root


@functools.lru_cache(maxsize=4)
def _answers(root: str) -> tuple[str, ...]:
    path = Path(root) / "answers.txt"
    words = tuple(w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip())
    if not words:
        raise DataError(f"{path} lists no answers")
    return words


def answer_vocab(root: Path | str | None = None) -> list[str]:
    """The answer vocabulary (13 words in easy-VQA), in the file's order."""
    return list(_answers(str(easy_vqa_root(root))))


@functools.lru_cache(maxsize=8)
def _split(root: str, split: str) -> tuple[VQASample, ...]:
    base = Path(root) / split
    qpath = base / "questions.json"
    try:
        rows = json.loads(qpath.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"easy-VQA questions file {qpath} does not exist") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"easy-VQA questions file {qpath} is corrupt ({e}); delete the easy-vqa package from "
            "the cache so that it is fetched again"
        ) from e
    vocab = set(_answers(root))
    images = base / "images"
    out = []
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 3):
            raise DataError(f"{qpath}: entry {i} is not [question, answer, image_id]")
        question, answer, image_id = row
        if answer not in vocab:
            raise DataError(f"{qpath}: entry {i} has answer {answer!r} outside answers.txt")
        path = images / f"{int(image_id)}.png"
        if not path.is_file():
            raise DataError(f"{qpath}: entry {i} refers to missing image file {path}")
        out.append(VQASample(path, str(question), str(answer), int(image_id)))
    return tuple(out)


def vqa_split(
    split: str = "train", root: Path | str | None = None, limit: int | None = None
) -> list[VQASample]:
    """The (image path, question, answer) samples of ``split`` ("train" or "test") in file order; the first
    ``limit`` only if given."""
    if split not in VQA_SPLITS:
        raise DataError(f"unknown easy-VQA split {split!r}; use one of {VQA_SPLITS}")
    samples = _split(str(easy_vqa_root(root)), split)
    return list(samples if limit is None else samples[:limit])

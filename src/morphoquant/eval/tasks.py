"""Built-in tasks: the offline calibration data and the evaluation that fit one kind of model.

* ``text-lm`` (Llama/Qwen2 causal LMs): calibration = random 512-token windows of the Wikipedia calibration split;
  evaluation = perplexity on non-overlapping windows of the disjoint evaluation split.
* ``speech-asr`` (Whisper): calibration = text-to-speech (espeak-ng, several voices/speeds) of calibration-split
  sentences with their transcripts as decoder inputs; evaluation = word error rate on the 8 real alsa speech
  clips plus text-to-speech of evaluation-split sentences.
* ``vision`` (DINOv2): calibration = real photos; evaluation = per-token cosine / relative error of the final
  hidden states against the full-precision model on held-out photos.

Calibration items are always drawn from data disjoint from what is scored (method.md §3 defect 8).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..pipeline.stack import Sample


class TaskError(ValueError):
    """A model for which no built-in task exists, or a task input that cannot be built."""


@dataclass
class Task:
    kind: str
    processor: object
    eval_size: int = 16
    seq_len: int = 512
    metric: str = ""
    lower_is_better: bool = True
    _cache: dict = field(default_factory=dict)

    def calibration_samples(self, n: int, seq_len: int, seed: int = 0) -> list[Sample]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, reference: nn.Module | None = None, progress: bool = False) -> dict:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"task": self.kind, "metric": self.metric, "eval_size": self.eval_size, "seq_len": self.seq_len}


class TextLMTask(Task):
    """Wikipedia perplexity (see module docstring)."""

    def __init__(self, tokenizer, eval_windows: int = 16, seq_len: int = 512, batch: int = 4):
        super().__init__("text-lm", tokenizer, eval_windows, seq_len, "wiki_ppl", True)
        self.batch = batch

    def calibration_samples(self, n, seq_len, seed=0):
        from ..data import calibration_windows
        w = calibration_windows(self.processor, n, seq_len, seed)
        return [{"input_ids": w[i:i + self.batch], "attention_mask": torch.ones_like(w[i:i + self.batch])}
                for i in range(0, n, self.batch)]

    def evaluate(self, model, reference=None, progress=False):
        from ..data import evaluation_windows
        from ..methods.mquant import modality_context
        from .perplexity import evaluate_perplexity
        w = evaluation_windows(self.processor, self.seq_len, self.eval_size)
        with modality_context(torch.tensor([0])):     # every token is text (modality-specific layers need it)
            res = evaluate_perplexity(model, w, batch_size=self.batch, progress=progress)
        lo, hi = res.confidence_interval()
        # each window's mean token NLL (nats): two rows on the same windows compare pairwise, window by window
        return {"wiki_ppl": res.ppl, "wiki_ppl_ci95": [lo, hi], "eval_tokens": res.tokens,
                "wiki_nll_per_window": [float(v) for v in res.nll_per_window]}


def _sentences(split: str, n: int, min_words: int = 5, max_words: int = 18) -> list[str]:
    """The first ``n`` plain sentences (5–18 words, letters and basic punctuation) of a Wikipedia split."""
    from ..data import wiki_texts
    out = []
    for text in wiki_texts(split):
        for s in re.split(r"(?<=[.!?])\s+", text):
            words = s.split()
            if min_words <= len(words) <= max_words and re.fullmatch(r"[A-Za-z ,.'-]+[.!?]?", s):
                out.append(s)
                if len(out) >= n:
                    return out
    return out


class SpeechASRTask(Task):
    """Whisper word error rate (see module docstring)."""

    VOICES = (("en", 150), ("en-us", 170), ("en+f3", 160), ("en-gb", 140))

    def __init__(self, processor, eval_sentences: int = 16):
        super().__init__("speech-asr", processor, eval_sentences, 0, "wer", True)

    def _features(self, waves: list[np.ndarray]) -> torch.Tensor:
        fe = self.processor.feature_extractor
        return fe(waves, sampling_rate=16000, return_tensors="pt").input_features.float()

    def calibration_samples(self, n, seq_len=0, seed=0):
        from ..data import tts
        from .wer import whisper_prompt_ids
        tok = self.processor.tokenizer
        prefix = whisper_prompt_ids(tok)
        out = []
        for i, sent in enumerate(_sentences("calibration", n)):
            voice, speed = self.VOICES[(i + seed) % len(self.VOICES)]
            wave, _ = tts(sent, voice=voice, speed=speed)
            ids = prefix + tok(" " + sent, add_special_tokens=False).input_ids + [tok.eos_token_id]
            out.append({"input_features": self._features([wave]),
                        "decoder_input_ids": torch.tensor([ids])})
        if not out:
            raise TaskError("no calibration sentences could be built for speech calibration")
        return out

    def eval_items(self) -> list[tuple[str, np.ndarray]]:
        if "items" not in self._cache:
            from ..data import alsa_clips, tts
            items = [(c.transcript, c.waveform) for c in alsa_clips()]
            for i, sent in enumerate(_sentences("evaluation", self.eval_size)):
                voice, speed = self.VOICES[i % len(self.VOICES)]
                items.append((sent, tts(sent, voice=voice, speed=speed)[0]))
            self._cache["items"] = items
        return self._cache["items"]

    def evaluate(self, model, reference=None, progress=False):
        from .wer import transcribe_whisper, word_error_rate
        items = self.eval_items()
        hyps = transcribe_whisper(model, self.processor.feature_extractor, self.processor.tokenizer,
                                  [w for _, w in items])
        refs = [t for t, _ in items]
        n_alsa = 8
        return {"wer": word_error_rate(refs, hyps), "wer_alsa": word_error_rate(refs[:n_alsa], hyps[:n_alsa]),
                "wer_tts": word_error_rate(refs[n_alsa:], hyps[n_alsa:]) if len(refs) > n_alsa else None,
                "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:4]]}


class VisionTask(Task):
    """DINOv2 feature fidelity against the full-precision model (see module docstring)."""

    def __init__(self, processor, eval_images: int = 8):
        super().__init__("vision", processor, eval_images, 0, "cosine", False)

    def _pixels(self, images) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt").pixel_values.float()

    def _split(self):
        from ..data import real_images
        imgs = real_images()
        if len(imgs) < 4:
            raise TaskError("too few offline photos for a vision task (install scikit-image)")
        half = len(imgs) // 2
        return [i.image for i in imgs[:half]], [i.image for i in imgs[half:]]

    def calibration_samples(self, n, seq_len=0, seed=0):
        calib, _ = self._split()
        return [{"pixel_values": self._pixels([img])} for img in calib[:n]]

    def evaluate(self, model, reference=None, progress=False):
        _, held_out = self._split()
        px = self._pixels(held_out[: self.eval_size])
        if reference is None:
            return {"cosine": 1.0, "rel_error": 0.0}
        with torch.no_grad():
            a = reference(pixel_values=px).last_hidden_state
            b = model(pixel_values=px).last_hidden_state
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()
        rel = (a - b).norm() / a.norm()
        return {"cosine": float(cos), "rel_error": float(rel)}


def task_for(model: nn.Module, processor, **kw) -> Task:
    """The built-in task that fits ``model``; :class:`TaskError` listing the kinds otherwise."""
    name = type(model).__name__
    # the CLI's --eval-size arrives as eval_windows; it sizes every task (windows, sentences, images, items)
    size = kw.get("eval_windows")
    if name.endswith("ForCausalLM"):
        return TextLMTask(processor, **{k: v for k, v in kw.items() if k in ("eval_windows", "seq_len")})
    if name.startswith("Whisper"):
        size = kw.get("eval_sentences", size)
        return SpeechASRTask(processor, **({"eval_sentences": size} if size is not None else {}))
    if name.startswith("Dinov2"):
        size = kw.get("eval_images", size)
        return VisionTask(processor, **({"eval_images": size} if size is not None else {}))
    if name.startswith("OmniMini"):
        from ..models.omnimini import projector_digest
        from .omnimini import OmniMiniTask
        # the digest is part of the task's description: rows measured with other projectors are never reused
        return OmniMiniTask(processor, eval_size=kw.get("eval_windows"), projectors_sha256=projector_digest(model))
    raise TaskError(f"no built-in calibration/evaluation task for {name}; built-in tasks cover causal LMs "
                    "(wiki perplexity), Whisper (word error rate), DINOv2 (feature fidelity) and OmniMini. Use "
                    "the Python API with your own calibration samples for other models.")

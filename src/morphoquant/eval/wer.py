"""Whisper transcription (greedy) and word error rate.

WER is corpus-level: ``WER = (S + D + I) / N`` where S, D, I are the word substitutions, deletions and insertions
of the minimum-edit alignment of each (normalised) hypothesis to its (normalised) reference, summed over all
pairs, and N is the total number of reference words. Both sides pass through :func:`normalize_transcript`
first:

1. Unicode NFKC, then lowercase (``str.lower``);
2. apostrophes (``'`` and ``’``) are deleted, so ``don't`` -> ``dont``;
3. every other punctuation or symbol character (Unicode categories ``P*`` and ``S*``) becomes a space, so
   ``"state-of-the-art"`` -> ``state of the art``;
4. runs of whitespace collapse to one space and the ends are stripped.

So ``"Hello, World!"`` and ``"hello world"`` both normalise to ``hello world`` (WER 0). No number or spelling
normalisation is done (``"2"`` and ``"two"`` differ).
"""
from __future__ import annotations

import inspect
import logging
import unicodedata
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

__all__ = ["normalize_transcript", "transcribe_whisper", "transcribe_whisper_features", "whisper_features",
           "whisper_prompt_ids", "word_error_rate"]

logger = logging.getLogger(__name__)

_APOSTROPHES = {"'", "\u2019"}


def normalize_transcript(text: str) -> str:
    """Lowercase, drop apostrophes, turn other punctuation/symbols into spaces, collapse whitespace (see module)."""
    text = unicodedata.normalize("NFKC", text).lower()
    chars = []
    for ch in text:
        if ch in _APOSTROPHES:
            continue
        cat = unicodedata.category(ch)
        chars.append(" " if cat[0] in ("P", "S") else ch)
    return " ".join("".join(chars).split())


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus-level WER ``(S + D + I) / N`` of normalised hypotheses against normalised references (via jiwer).

    A reference that is empty after normalisation contributes its hypothesis words as insertions and no reference
    words. Raises ValueError on a length mismatch or when the references hold no words at all.
    """
    import jiwer

    if isinstance(references, str) or isinstance(hypotheses, str):
        raise TypeError("references and hypotheses must be sequences of strings, not single strings; wrap them "
                        "in a list")
    if len(references) != len(hypotheses):
        raise ValueError(f"got {len(references)} references but {len(hypotheses)} hypotheses; pass one hypothesis "
                         "per reference, in the same order")
    refs = [normalize_transcript(r) for r in references]
    hyps = [normalize_transcript(h) for h in hypotheses]
    errors = 0
    ref_words = 0
    pairs_r, pairs_h = [], []
    for r, h in zip(refs, hyps):
        if not r:
            errors += len(h.split())
        else:
            pairs_r.append(r)
            pairs_h.append(h)
    if pairs_r:
        out = jiwer.process_words(pairs_r, pairs_h)
        errors += out.substitutions + out.deletions + out.insertions
        ref_words += out.substitutions + out.deletions + out.hits
    if ref_words == 0:
        raise ValueError("the references contain no words after normalisation (lowercase, punctuation removed); "
                         "WER is undefined — check that the reference transcripts are not empty")
    return errors / ref_words


# --------------------------------------------------------------------------------------------------- whisper


def whisper_prompt_ids(tokenizer, model: nn.Module | None = None, language: str = "en") -> list[int]:
    """Forced decoder prefix for transcription without timestamps.

    English-only checkpoints (``*.en``: ``generation_config.is_multilingual`` false, or no ``<|en|>`` token in
    the tokenizer) use ``[<|startoftranscript|>, <|notimestamps|>]``; multilingual ones use
    ``[<|startoftranscript|>, <|{language}|>, <|transcribe|>, <|notimestamps|>]``.
    """
    def tid(token: str) -> int | None:
        i = tokenizer.convert_tokens_to_ids(token)
        if i is None or (tokenizer.unk_token_id is not None and i == tokenizer.unk_token_id
                         and token != tokenizer.unk_token):
            return None
        return int(i)

    sot, nots = tid("<|startoftranscript|>"), tid("<|notimestamps|>")
    if sot is None or nots is None:
        raise ValueError("the tokenizer has no <|startoftranscript|> / <|notimestamps|> tokens; pass the "
                         "WhisperTokenizer that belongs to the model")
    gen_cfg = getattr(model, "generation_config", None) if model is not None else None
    multilingual = getattr(gen_cfg, "is_multilingual", None)
    lang, task = tid(f"<|{language}|>"), tid("<|transcribe|>")
    if multilingual is None:
        multilingual = lang is not None and task is not None
    if not multilingual:
        return [sot, nots]
    if lang is None or task is None:
        raise ValueError(f"multilingual Whisper needs the <|{language}|> and <|transcribe|> tokens, which the "
                         "tokenizer lacks; pass the model's own tokenizer or a supported language code")
    return [sot, lang, task, nots]


def _suppressed(model: nn.Module, vocab_size: int) -> tuple[list[int], list[int]]:
    cfg = getattr(model, "generation_config", None)
    always = [t for t in (getattr(cfg, "suppress_tokens", None) or []) if 0 <= t < vocab_size]
    begin = [t for t in (getattr(cfg, "begin_suppress_tokens", None) or []) if 0 <= t < vocab_size]
    return always, begin


def _greedy(model: nn.Module, features: torch.Tensor, prompt: torch.Tensor, eos: int,
            max_new_tokens: int) -> torch.Tensor:
    """Manual greedy loop with a KV cache; applies the generation config's suppress / begin-suppress tokens the
    way ``generate`` does. Returns the generated tokens only ``[b, <= max_new_tokens]`` (eos-padded)."""
    batch = features.shape[0]
    encoder_outputs = model.get_encoder()(features)
    ids = prompt.unsqueeze(0).expand(batch, -1)
    past = None
    finished = torch.zeros(batch, dtype=torch.bool, device=features.device)
    generated: list[torch.Tensor] = []
    step_input = ids
    # transformers >= 5.x names the KV cache `cache`; older releases call it `past_key_values`
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for step in range(max_new_tokens):
        out = model(encoder_outputs=encoder_outputs, decoder_input_ids=step_input, use_cache=True,
                    return_dict=True, **{cache_kw: past})
        past = getattr(out, "cache", None)
        if past is None:
            past = getattr(out, "past_key_values", None)
        logits = out.logits[:, -1].float()
        always, begin = _suppressed(model, logits.shape[-1])
        if always:
            logits[:, always] = -float("inf")
        if step == 0 and begin:
            logits[:, begin] = -float("inf")
        nxt = logits.argmax(-1)
        nxt = torch.where(finished, torch.full_like(nxt, eos), nxt)
        generated.append(nxt)
        finished |= nxt == eos
        if bool(finished.all()):
            break
        step_input = nxt.unsqueeze(1)
    if not generated:
        return ids.new_zeros(batch, 0)
    return torch.stack(generated, dim=1)


class _DropMessage(logging.Filter):
    """Drops log records containing ``text``. Whisper checkpoints set ``max_length=448`` in their generation
    config, so ``generate(max_new_tokens=...)`` warns on every batch that both are set although max_new_tokens
    wins anyway (and passing ``max_length`` instead counts differently in Whisper's generate)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _generate(model: nn.Module, features: torch.Tensor, prompt: torch.Tensor, eos: int,
              max_new_tokens: int) -> torch.Tensor:
    batch = features.shape[0]
    quiet = _DropMessage("seem to have been set")
    gen_log = logging.getLogger("transformers.generation.utils")
    gen_log.addFilter(quiet)
    try:
        out = model.generate(features, decoder_input_ids=prompt.unsqueeze(0).expand(batch, -1).contiguous(),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, return_timestamps=False)
    finally:
        gen_log.removeFilter(quiet)
    seq = out.sequences if hasattr(out, "sequences") else out
    if not isinstance(seq, torch.Tensor):
        raise TypeError(f"model.generate returned {type(out).__name__}, expected a token tensor")
    # Whisper's generate strips the prompt; other implementations may not.
    if seq.shape[1] >= prompt.numel() and torch.equal(seq[:, :prompt.numel()].cpu(),
                                                      prompt.cpu().unsqueeze(0).expand(batch, -1)):
        seq = seq[:, prompt.numel():]
    return seq


def _decode(tokenizer, tokens: torch.Tensor, eos: int) -> list[str]:
    texts = []
    for row in tokens.tolist():
        if eos in row:
            row = row[:row.index(eos)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def whisper_features(feature_extractor, waveforms: list[np.ndarray], sr: int = 16000,
                     batch_size: int = 8) -> torch.Tensor:
    """Log-mel ``input_features`` ``[n, mels, frames]`` (float32) of mono ``sr`` Hz waveforms, computed the way
    :func:`transcribe_whisper` computes them (the feature extractor called on chunks of ``batch_size``; each
    waveform is padded to 30 s and normalised on its own, so the chunking does not change the values)."""
    expected_sr = getattr(feature_extractor, "sampling_rate", sr)
    if expected_sr != sr:
        raise ValueError(f"waveforms are at {sr} Hz but the feature extractor expects {expected_sr} Hz; resample "
                         "them first")
    chunks = []
    for start in range(0, len(waveforms), batch_size):
        chunk = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waveforms[start:start + batch_size]]
        chunks.append(feature_extractor(chunk, sampling_rate=sr, return_tensors="pt").input_features.float())
    if not chunks:
        raise ValueError("no waveforms given")
    return torch.cat(chunks)


def transcribe_whisper(model: nn.Module, feature_extractor, tokenizer, waveforms: list[np.ndarray],
                       sr: int = 16000, max_new_tokens: int = 64, batch_size: int = 8,
                       method: Literal["auto", "generate", "greedy"] = "auto",
                       language: str = "en") -> list[str]:
    """Greedy-decode each waveform (mono float, ``sr`` Hz, <= 30 s) with a Whisper model; one string per input.

    The decoder is forced with :func:`whisper_prompt_ids` (``[<|startoftranscript|>, <|notimestamps|>]`` for
    English-only models) and then picks ``argmax`` tokens until ``<|endoftext|>`` or ``max_new_tokens`` (capped at
    ``max_target_positions - len(prompt)``). ``method="generate"`` uses ``model.generate`` (greedy, no
    timestamps); ``"greedy"`` a manual KV-cached loop; ``"auto"`` tries ``generate`` and falls back to the loop
    (with a warning) when ``generate`` rejects the model's generation config. Special tokens are dropped from
    the decoded text, which is stripped of surrounding whitespace. The same as
    :func:`transcribe_whisper_features` on :func:`whisper_features` of the waveforms.
    """
    if method not in ("auto", "generate", "greedy"):
        raise ValueError(f"method must be 'auto', 'generate' or 'greedy', got {method!r}")
    if not waveforms:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    features = whisper_features(feature_extractor, waveforms, sr, batch_size)
    return transcribe_whisper_features(model, tokenizer, features, max_new_tokens, batch_size, method, language)


def transcribe_whisper_features(model: nn.Module, tokenizer, features: torch.Tensor, max_new_tokens: int = 64,
                                batch_size: int = 8, method: Literal["auto", "generate", "greedy"] = "auto",
                                language: str = "en", return_tokens: bool = False):
    """:func:`transcribe_whisper` on precomputed log-mel ``features`` ``[n, mels, frames]`` (see
    :func:`whisper_features`): one string per row. With ``return_tokens``, ``(texts, tokens)`` where ``tokens[i]``
    are the generated token ids of row ``i`` up to (not including) ``<|endoftext|>``."""
    if method not in ("auto", "generate", "greedy"):
        raise ValueError(f"method must be 'auto', 'generate' or 'greedy', got {method!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if features.shape[0] == 0:
        return ([], []) if return_tokens else []
    config = getattr(model, "config", None)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    prompt = torch.tensor(whisper_prompt_ids(tokenizer, model, language), dtype=torch.long, device=device)
    max_positions = getattr(config, "max_target_positions", None)
    if max_positions is not None:
        max_new_tokens = min(max_new_tokens, max_positions - prompt.numel())
        if max_new_tokens < 1:
            raise ValueError(f"max_target_positions={max_positions} leaves no room after the "
                             f"{prompt.numel()}-token prompt")
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        raise ValueError("neither the tokenizer nor the model config defines an eos token id")

    texts: list[str] = []
    token_rows: list[list[int]] = []
    use = method
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, features.shape[0], batch_size):
                chunk = features[start:start + batch_size].to(device=device, dtype=dtype)
                if use in ("auto", "generate"):
                    try:
                        tokens = _generate(model, chunk, prompt, eos, max_new_tokens)
                        use = "generate"
                    except (ValueError, AttributeError, TypeError, KeyError) as exc:
                        if use == "generate":
                            raise
                        logger.warning("model.generate failed (%s: %s); falling back to a manual greedy loop",
                                       type(exc).__name__, exc)
                        use = "greedy"
                if use == "greedy":
                    tokens = _greedy(model, chunk, prompt, eos, max_new_tokens)
                texts.extend(_decode(tokenizer, tokens, eos))
                for row in tokens.tolist():
                    token_rows.append(row[:row.index(eos)] if eos in row else row)
    finally:
        model.train(was_training)
    return (texts, token_rows) if return_tokens else texts

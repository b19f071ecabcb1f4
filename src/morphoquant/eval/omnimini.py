"""OmniMini tasks: image QA, spoken question + image QA, transcription and text perplexity.

* ``vqa_acc`` — easy-VQA **test** questions about the image: the answer is chosen by *scoring* the candidate
  answers of the question's type (yes/no, the 8 colours or the 3 shapes; easy-VQA's question templates fix the
  type) by the sum of the log-probabilities of the candidate's tokens after ``Answer:`` (every candidate has a
  distinct first token), not by free decoding, so a model that prefers a paraphrase is not penalised.
* ``spoken_vqa_acc`` — the same with the question spoken (espeak-ng, evaluation voices/speeds) instead of
  written: image, audio and text tokens in one sequence; candidates scored the same way.
* ``asr_wer`` — greedy transcription (stops at a newline, the end token, or ``3 x words + 8`` tokens) of
  held-out Wikipedia **evaluation**-split sentences; corpus WER via :func:`morphoquant.eval.wer.word_error_rate`.
* ``wiki_ppl`` — perplexity of the decoder on non-overlapping windows of the Wikipedia evaluation split (text
  only: equals SmolLM2-135M's own, since the decoder is unchanged).

``omni_acc = mean(vqa_acc, spoken_vqa_acc, max(0, 1 - asr_wer))`` is the headline (higher is better).

Per-modality fidelity (only with a ``reference`` model, i.e. for a quantized model against full precision):
``kl_text`` / ``kl_image`` / ``kl_audio`` = mean over the token rows of that modality of
``KL(p_ref || p) = sum_v p_ref(v) (log p_ref(v) - log p(v))``, the next-token distributions of the two models on
the spoken-QA prompts (image, audio and text tokens in one sequence; a row's modality is that of its input token).

Calibration (:meth:`OmniMiniTask.calibration_samples`) cycles through ``calib_kinds``: image QA and spoken QA
documents on easy-VQA *train* images never used in training, transcriptions of Wikipedia calibration-split
sentences, and text windows of the calibration split; all disjoint from every evaluation item. Drop a kind
(``calib_kinds``, or by modality with :meth:`OmniMiniTask.restrict_calibration_modalities` /
``morphoquant compare omnimini --calib-modalities image,text``) for the calibration-modality ablation.

``eval_size`` (the CLI's ``--eval-size``) scales all four tasks together from the image-QA count ``n``, keeping the
default proportions: ``n`` image-QA, ``3n/4`` spoken-QA, ``3n/8`` transcription items and ``n/16`` text windows
(each rounded, at least 1); ``eval_size=64`` gives the default sizes.
"""
from __future__ import annotations

import copy
import time
import weakref

import torch
from torch import nn

from ..pipeline.stack import Sample
from .fidelity import kl_from_logprobs
from .tasks import Task

CALIB_KINDS = ("image_qa", "spoken_qa", "asr", "text")
DEFAULT_SIZES = {"image_qa": 64, "spoken_qa": 48, "asr": 24, "wiki_windows": 4}
# the modalities whose tokens each calibration kind puts into the decoder (prompts and answers are text)
KIND_MODALITIES = {"image_qa": ("image", "text"), "spoken_qa": ("image", "audio", "text"),
                   "asr": ("audio", "text"), "text": ("text",)}
CALIB_MODALITIES = ("image", "audio", "text")
# per-task columns of `morphoquant compare` tables (besides the headline omni_acc)
TABLE_METRICS = ("vqa_acc", "spoken_vqa_acc", "asr_wer", "wiki_ppl", "kl_text", "kl_image", "kl_audio")


def sizes_for_eval_size(n: int) -> dict:
    """Task sizes scaled from ``n`` image-QA items in the default proportions (``n = 64`` → the defaults)."""
    if n < 1:
        raise ValueError(f"OmniMini evaluation size must be at least 1 (got {n}); pass e.g. --eval-size 32")
    return {k: max(1, round(v * n / DEFAULT_SIZES["image_qa"])) for k, v in DEFAULT_SIZES.items()}


def calib_kinds_for_modalities(modalities) -> tuple[str, ...]:
    """The calibration kinds whose documents hold only tokens of ``modalities`` (a subset of image, audio,
    text): ``{image, text}`` → image QA and text windows; ``{audio, text}`` → transcriptions and text windows;
    ``{text}`` → text windows only. Spoken QA (image + audio + text) needs all three."""
    mods = {str(m).strip().lower() for m in modalities}
    unknown = sorted(mods - set(CALIB_MODALITIES))
    if unknown or not mods:
        raise ValueError(f"calibration modalities {sorted(mods) if mods else '(none)'} are not a non-empty subset of "
                         f"{', '.join(CALIB_MODALITIES)}; pass e.g. image,audio,text or text")
    kinds = tuple(k for k in CALIB_KINDS if set(KIND_MODALITIES[k]) <= mods)
    if not kinds:
        raise ValueError(f"no OmniMini calibration document holds only {', '.join(sorted(mods))}: every one has text "
                         "tokens (the prompt); add text, e.g. " + ",".join(sorted(mods) + ["text"]))
    return kinds


class OmniMiniTask(Task):
    """The four OmniMini tasks (see module docstring)."""

    table_metrics = TABLE_METRICS

    def __init__(self, processor, sizes: dict | None = None, seq_len: int = 256,
                 calib_kinds: tuple[str, ...] = CALIB_KINDS, seed: int = 0, eval_size: int | None = None,
                 projectors_sha256: str | None = None):
        base = DEFAULT_SIZES if eval_size is None else sizes_for_eval_size(eval_size)
        self.sizes = {**base, **(sizes or {})}
        unknown = set(self.sizes) - set(DEFAULT_SIZES)
        if unknown:
            raise ValueError(f"unknown OmniMini task sizes {sorted(unknown)}; use {sorted(DEFAULT_SIZES)}")
        bad = [k for k in calib_kinds if k not in CALIB_KINDS]
        if bad or not calib_kinds:
            raise ValueError(f"calibration kinds {list(calib_kinds)} are not a non-empty subset of {CALIB_KINDS}")
        super().__init__("omnimini", processor, self.sizes["image_qa"], seq_len, "omni_acc", False)
        self.calib_kinds = tuple(calib_kinds)
        self.seed = seed
        self.projectors_sha256 = projectors_sha256     # which trained projectors (models.omnimini.projector_digest)

    def describe(self) -> dict:
        mods = sorted({m for k in self.calib_kinds for m in KIND_MODALITIES[k]}, key=CALIB_MODALITIES.index)
        return {**super().describe(), "sizes": self.sizes, "calib_kinds": list(self.calib_kinds),
                "calib_modalities": mods,
                "answer_selection": "scoring of the candidate answers of the question's type (sum of token log-probs)",
                **({"projectors_sha256": self.projectors_sha256} if self.projectors_sha256 else {})}

    def restrict_calibration_modalities(self, modalities) -> tuple[str, ...]:
        """Calibrate only on documents holding tokens of ``modalities`` (see :func:`calib_kinds_for_modalities`);
        returns the calibration kinds kept."""
        self.calib_kinds = calib_kinds_for_modalities(modalities)
        return self.calib_kinds

    # -- samples -----------------------------------------------------------------------------------
    def sample_of(self, example, with_target: bool = True) -> Sample:
        """Model inputs for one :class:`~morphoquant.data.omnimini.OmniExample` (whole document, or prompt)."""
        from PIL import Image
        text = "".join(t for t, _ in example.segments) if with_target else example.prompt
        n_aud = text.count(self.processor.AUDIO)
        n_img = text.count(self.processor.IMAGE)
        return self.processor(text, images=[Image.open(p) for p in example.images[:n_img]],
                              audios=[s.waveform() for s in example.speech[:n_aud]])

    def calibration_samples(self, n, seq_len=None, seed=0):
        """``n`` samples cycling through ``calib_kinds`` (one document or one text window each)."""
        from ..data import calibration_windows
        from ..data.omnimini import calibration_examples
        seq_len = seq_len or self.seq_len
        kinds = [self.calib_kinds[i % len(self.calib_kinds)] for i in range(n)]
        doc_kinds = tuple(k for k in self.calib_kinds if k != "text")
        n_docs = sum(k != "text" for k in kinds)
        docs = iter(calibration_examples(n_docs, seed, doc_kinds) if n_docs else [])
        n_text = kinds.count("text")
        windows = calibration_windows(self.processor.tokenizer, n_text, seq_len, seed) if n_text else None
        out, w = [], 0
        for k in kinds:
            if k == "text":
                ids = windows[w:w + 1]
                w += 1
                out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            else:
                out.append(self.sample_of(next(docs)))
        return out

    def _items(self, kind: str) -> list:
        if kind not in self._cache:
            from ..data.omnimini import evaluation_examples
            exs = evaluation_examples(kind, self.sizes[kind], self.seed)
            self._cache[kind] = [(e, self.sample_of(e, with_target=False)) for e in exs]
        return self._cache[kind]

    # -- scoring -----------------------------------------------------------------------------------
    def _candidates(self) -> list[tuple[str, list[int]]]:
        if "candidates" not in self._cache:
            from ..data import answer_vocab
            tok = self.processor.tokenizer
            self._cache["candidates"] = [(a, tok(" " + a, add_special_tokens=False).input_ids)
                                         for a in answer_vocab()]
        return self._cache["candidates"]

    @torch.no_grad()
    def choose_answer(self, model: nn.Module, sample: Sample, allowed: tuple[str, ...] | None = None,
                      prompt_out=None) -> str:
        """The candidate answer (among ``allowed``, default all) with the highest total log-probability after
        the prompt. ``prompt_out``: the model's output on ``sample`` with ``use_cache=True``, if already computed
        (its last position's logits and its cache are used; it is not modified)."""
        out = prompt_out if prompt_out is not None else model(**sample, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[0, -1].float(), -1)
        best, best_score = None, -float("inf")
        for answer, ids in self._candidates():
            if allowed is not None and answer not in allowed:
                continue
            score = float(first[ids[0]])
            if len(ids) > 1:
                past = copy.deepcopy(out.cache)
                n = sample["input_ids"].shape[1]
                cont = torch.tensor([ids[:-1]])
                mask = torch.ones(1, n + len(ids) - 1, dtype=torch.long)
                more = model(input_ids=cont, attention_mask=mask, cache=past, use_cache=True)
                lp = torch.log_softmax(more.logits[0].float(), -1)
                score += float(sum(lp[j, ids[j + 1]] for j in range(len(ids) - 1)))
            if score > best_score:
                best, best_score = answer, score
        return best

    @torch.no_grad()
    def transcribe(self, model: nn.Module, sample: Sample, max_new_tokens: int = 64) -> str:
        """Greedy decoding until a newline / end token / ``max_new_tokens``."""
        tok = self.processor.tokenizer
        stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")}
        out = model(**sample, use_cache=True, logits_to_keep=1)
        n = sample["input_ids"].shape[1]
        ids: list[int] = []
        while len(ids) < max_new_tokens:
            nxt = int(out.logits[0, -1].argmax())
            if nxt in stop or "\n" in tok.decode([nxt]):
                break
            ids.append(nxt)
            out = model(input_ids=torch.tensor([[nxt]]), attention_mask=torch.ones(1, n + len(ids), dtype=torch.long),
                        cache=out.cache, use_cache=True)
        return tok.decode(ids, skip_special_tokens=True).strip()

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate_kind(self, model: nn.Module, kind: str, progress: bool = False) -> dict:
        t = time.time()
        if kind in ("image_qa", "spoken_qa"):
            from ..data.omnimini import answer_type_candidates
            preds = [(e.answer, self.choose_answer(model, s, answer_type_candidates(e.answer)))
                     for e, s in self._items(kind)]
            acc = sum(a == p for a, p in preds) / len(preds)
            key = "vqa_acc" if kind == "image_qa" else "spoken_vqa_acc"
            return {key: acc, f"{key}_n": len(preds), f"{key}_seconds": time.time() - t}
        if kind == "asr":
            from .wer import word_error_rate
            refs, hyps = [], []
            for e, s in self._items(kind):
                refs.append(e.answer)
                hyps.append(self.transcribe(model, s, 3 * len(e.answer.split()) + 8))
            return {"asr_wer": word_error_rate(refs, hyps), "asr_n": len(refs),
                    "asr_examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]],
                    "asr_seconds": time.time() - t}
        if kind == "wiki":
            from ..data import evaluation_windows
            from .perplexity import evaluate_perplexity
            w = evaluation_windows(self.processor.tokenizer, self.seq_len, self.sizes["wiki_windows"])
            res = evaluate_perplexity(model, w, batch_size=1, progress=progress)
            return {"wiki_ppl": res.ppl, "wiki_tokens": res.tokens, "wiki_seconds": time.time() - t}
        raise ValueError(f"unknown OmniMini task {kind!r}")

    # -- per-modality fidelity ---------------------------------------------------------------------
    kl_cache_mb: float = 1024.0
    """Largest size of the cached reference logits (fp32, prompt rows x vocabulary: about 180 MB for the 18
    spoken-QA prompts of ``--eval-size 24``); prompts beyond it re-run the reference for every evaluated model."""

    @staticmethod
    def _weights_key(model: nn.Module) -> tuple:
        # identity and in-place version of every tensor: a swapped module or an in-place edit changes the key
        return tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))

    def _reference_store(self, reference: nn.Module) -> dict:
        """The cache of the reference's logits per spoken-QA prompt: kept across evaluated models while the
        reference object and its weights are unchanged, emptied otherwise."""
        key = self._weights_key(reference)
        cached = self._cache.get("reference_logits")
        if cached is None or cached[0]() is not reference or cached[1] != key:
            cached = self._cache["reference_logits"] = (weakref.ref(reference), key, {})
        return cached[2]

    def _reference_logprobs(self, reference: nn.Module, store: dict, index: int, sample: Sample) -> torch.Tensor:
        """``log_softmax`` (fp64) of the reference's logits on prompt ``index``, from ``store`` when cached; new
        logits are cached while the store fits :attr:`kl_cache_mb` (fp32 logits exactly as the model returns
        them, so the numbers equal the uncached ones)."""
        logits = store.get(index)
        if logits is None:
            logits = reference(**sample).logits[0]
            used = sum(t.numel() * t.element_size() for t in store.values())
            if used + logits.numel() * logits.element_size() <= self.kl_cache_mb * 2 ** 20:
                store[index] = logits
        return torch.log_softmax(logits.double(), -1)

    @torch.no_grad()
    def _kl_pass(self, model: nn.Module, reference: nn.Module, score_answers: bool) -> dict:
        """Mean ``KL(reference || model)`` per input-token modality over the spoken-QA prompts, from ONE forward
        of ``model`` per prompt; with ``score_answers`` the same forward's last position and cache also choose
        the answer (``spoken_vqa_acc``)."""
        from ..data.omnimini import answer_type_candidates
        t = time.time()
        cfg = self.processor.config
        store = self._reference_store(reference)
        total = {"text": 0.0, "image": 0.0, "audio": 0.0}
        rows = dict.fromkeys(total, 0)
        right = 0
        items = self._items("spoken_qa")
        for i, (e, s) in enumerate(items):
            out = model(**s, use_cache=True) if score_answers else model(**s)
            lp_ref = self._reference_logprobs(reference, store, i, s)
            lp = torch.log_softmax(out.logits[0].double(), -1)
            kl = kl_from_logprobs(lp_ref, lp)   # fp64: the per-token terms are summed over many rows
            ids = s["input_ids"][0]
            for name, sel in (("image", ids == cfg.image_token_id), ("audio", ids == cfg.audio_token_id),
                              ("text", (ids != cfg.image_token_id) & (ids != cfg.audio_token_id))):
                total[name] += float(kl[sel].sum())
                rows[name] += int(sel.sum())
            if score_answers:
                right += self.choose_answer(model, s, answer_type_candidates(e.answer), prompt_out=out) == e.answer
        seconds = time.time() - t
        res = {f"kl_{m}": total[m] / rows[m] for m in total if rows[m]}
        res.update({f"kl_{m}_rows": rows[m] for m in total}, kl_seconds=seconds)
        if score_answers:
            res.update(spoken_vqa_acc=right / len(items), spoken_vqa_acc_n=len(items),
                       spoken_vqa_acc_seconds=seconds)
        return res

    def modality_kl(self, model: nn.Module, reference: nn.Module) -> dict:
        """Mean ``KL(reference || model)`` of the next-token distributions per input-token modality, over the
        spoken-QA prompts (see module docstring)."""
        return self._kl_pass(model, reference, score_answers=False)

    def evaluate(self, model, reference=None, progress=False):
        out: dict = {}
        with_kl = reference is not None and reference is not model and self.sizes["spoken_qa"]
        if with_kl:
            out.update(self._kl_pass(model, reference, score_answers=True))
        for kind in ("image_qa", "spoken_qa", "asr", "wiki"):
            if kind == "wiki" and not self.sizes["wiki_windows"]:
                continue
            if (kind != "wiki" and not self.sizes[kind]) or (kind == "spoken_qa" and with_kl):
                continue
            out.update(self.evaluate_kind(model, kind, progress))
        parts = [out.get("vqa_acc"), out.get("spoken_vqa_acc"),
                 None if "asr_wer" not in out else max(0.0, 1.0 - out["asr_wer"])]
        parts = [p for p in parts if p is not None]
        out["omni_acc"] = sum(parts) / len(parts) if parts else None
        return out

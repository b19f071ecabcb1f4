#!/usr/bin/env python
"""The peer toolkit, measured our way: llm-compressor quantizes the model, MorphoQuant's evaluator scores it.

llm-compressor 0.14.0.1 pins transformers 5.17 and compressed-tensors 0.19, so it lives in its own virtual
environment (default ``/work/venv-llmc``; created on first use with ``pip install torch==2.13.0`` and then
``pip install torch==2.13.0 llmcompressor==0.14.0.1`` -- torch is pinned in both commands so that pip keeps the
local CPU wheel instead of pulling a multi-GB CUDA build).

Flow (run this file with *our* interpreter, ``/work/venv/bin/python``):

1. **Same data.** The calibration windows are exactly those of ``morphoquant quantize --calib N --seq-len L
   --seed S`` (``TextLMTask.calibration_samples``: N random L-token windows of the Wikipedia calibration split)
   and the evaluation windows exactly those of ``--eval-size K`` (``evaluation_windows``: the first K
   non-overlapping L-token windows of the disjoint evaluation split). They are written once to
   ``windows.safetensors`` (int64, with their SHA-256 in the metadata) and read by the peer's process.
2. **FP reference in our environment.** ``TextLMTask.evaluate`` on the full-precision model (transformers of our
   venv) gives the same FP perplexity as the ``fp32`` row of ``morphoquant quantize``; the ``fp32`` row computed
   in the peer's environment must agree with it (it checks that both environments score the same way).
3. **One peer process per scheme** (``<venv>/bin/python peer_llmcompressor.py _worker JOB``): load the
   model in fp32, run llm-compressor's ``oneshot`` with the scheme's modifiers on every ``Linear`` except
   ``lm_head``, then score the *in-memory* model -- llm-compressor's own fake-quant forward, with dynamic
   activation quantization live -- with our ``evaluate_perplexity`` (``src/morphoquant/eval/perplexity.py``,
   loaded from its file; it needs only torch and tqdm), so

       PPL = exp( sum_w NLL_w / (n * (T - 1)) )        over the n evaluation windows of T tokens.

   No checkpoint is saved and reloaded: a compressed-tensors W4A4 checkpoint reloaded with a newer transformers
   silently drops its activation quantizers (findings.md). Instead each quantized row carries a proof that
   activation quantization is active: on the first quantized ``Linear`` and one evaluation window,
   ``rel_vs_weight_only = |y - x W_q^T| / |y|`` (large when inputs are quantized, 0 for W*A16) and
   ``rel_vs_expected = |y - Q(x) W_q^T| / |y|`` with ``Q`` the per-token symmetric int-b quantizer
   re-implemented here (scale = amax / ((2^b - 1) / 2), codes clamped to [-2^(b-1), 2^(b-1) - 1]); ~0 when the
   peer's activation quantizer is the one documented.
4. **Table.** ``peer.md`` and ``peer.json`` in ``--out`` (rewritten after every scheme; a finished scheme whose
   row matches the same windows is not run again unless ``--overwrite``). Each JSON row has ``recipe``, ``ppl``,
   ``model``, ``calib`` and ``eval`` so it can be merged into a ``morphoquant compare`` table.

Schemes (weights int symmetric, groups of ``--group-size``; activations int symmetric dynamic per token):

====================== ===================================================================================
``fp32``               no quantization (the peer environment's FP perplexity)
``w8a8-rtn``           compressed-tensors ``W8A8`` preset (int8 per-channel weights, int8 per-token acts), RTN
``w4a16-rtn``          int4 g``G`` weights, ``QuantizationModifier`` (round to nearest)
``w4a16-gptq``         int4 g``G`` weights, ``GPTQModifier`` (llm-compressor defaults: block 128, damping
                       0.01, static act-order)
``w4a16-awq``          int4 g``G`` weights: ``AWQModifier()`` (its defaults: the architecture's registered mappings,
                       ``n_grid`` 20, ``duo_scaling`` -- scales from activation *and* weight magnitudes) then
                       ``QuantizationModifier`` (RTN). llm-compressor's AWQ has no weight-clip search, unlike
                       AWQ's paper and our ``awq`` recipe (``clip: true``); not in the default list
``w4a4-rtn``           int4 g``G`` weights + int4 per-token acts, ``QuantizationModifier``
``w4a4-gptq``          the same with ``GPTQModifier``
``w4a4-spinquant-gptq`` ``SpinQuantModifier(R1, R2, random-hadamard)`` then ``GPTQModifier`` W4A4 (the
                       deterministic Hadamard refuses widths 576 / 896 that are not powers of two)
``w4a4-smoothquant-gptq`` ``SmoothQuantModifier(0.8)`` then ``GPTQModifier`` W4A4 (not in the default list)
====================== ===================================================================================

    /work/venv/bin/python scripts/peer_llmcompressor.py                      # SmolLM2-135M, default schemes
    /work/venv/bin/python scripts/peer_llmcompressor.py --model qwen2.5-0.5b --schemes w4a4-rtn,w4a4-gptq
    /work/venv/bin/python scripts/peer_llmcompressor.py --model whisper-tiny.en   # word error rate, see below

**Whisper** (``model_type`` ``whisper``; the ``speech-asr`` task of ``morphoquant compare whisper-tiny.en
--calib 16 --eval-size 16``). Same flow, other data and metric:

* data: ``SpeechASRTask.calibration_samples(--calib, seed=--seed)`` (text-to-speech of calibration-split
  sentences: ``input_features`` ``[1, 80, 3000]`` and ``decoder_input_ids`` = prompt + transcript + eos) and
  ``eval_items()`` (the 8 ALSA clips + ``--eval-size`` text-to-speech sentences of the evaluation split, default
  16). ``speech.safetensors`` holds the calibration features (float32), the decoder ids (padded, with their
  lengths) and the log-mel features of the evaluation waveforms computed by our feature extractor
  (``wer.whisper_features``, exactly what ``transcribe_whisper`` computes); the reference transcripts and the
  forced decoder prompt are in its metadata, and each set's SHA-256 covers its tensors (and references).
* peer: ``WhisperForConditionalGeneration`` in fp32; the modifiers target every ``Linear`` except ``proj_out``
  (the output head, tied to the decoder embedding): all encoder and decoder layer linears -- self-attention
  q/k/v/out, cross-attention q/k/v/out, fc1, fc2 -- as ``WhisperAdapter`` quantizes them (the convolutions and
  embeddings are no Linear, in neither toolkit). GPTQ calibrates on a DataLoader of our samples with
  llm-compressor's ``basic`` pipeline: every layer's Hessian comes from one full-precision pass over the 16
  utterances (no quantization error propagated from layer to layer, unlike the LMs' sequential pipeline). The
  sequential pipeline cannot split Whisper in this version: its tracer wraps ``WhisperModel.forward``'s ``if
  encoder_outputs is None:`` block (and the encoder's LayerDrop ``if not to_drop:``), so the whole encoder runs
  inside wrapped code of the first subgraph (5 subgraphs traced for 8 layer targets, 5 for the targets
  ``WhisperEncoder`` + ``WhisperDecoderLayer``); its Linears get Hessians but no weight observation, and GPTQ
  stops with ``AssertionError: No statistics available. Call observer(value) first.`` After ``oneshot`` the worker removes compressed-tensors' (CPU) offload wrapper, whose
  argument copying turns ``encoder_outputs`` into a plain dict that ``WhisperModel.forward`` cannot index (the
  quantized forwards stay; the activation check runs after it). The worker decodes greedily with our ``transcribe_whisper_features`` (``wer.py``
  loaded from its file; same prompt, suppression, 64 new tokens, batches of 8) and writes the hypotheses' token
  ids into its row; the driver decodes them with our tokenizer and computes ``wer`` / ``wer_alsa`` / ``wer_tts``
  with our ``word_error_rate`` (jiwer is not in the peer's venv). The activation check uses the first quantized
  Linear (``model.encoder.layers.0.self_attn.k_proj``) on the first evaluation utterance.
* ``w4a4-spinquant-gptq`` is refused: llm-compressor 0.14.0.1's SpinQuant has only Llama-style mappings
  (RMSNorm ``input_layernorm`` / ``post_attention_layernorm`` fused into q/k/v and up/gate, ``o_proj``,
  ``down_proj``, ``model.norm`` -> ``lm_head``); Whisper's biased LayerNorms, ``out_proj``, ``fc1`` / ``fc2`` and
  encoder-decoder stacks match none of them.

Heavy: one thread by default (``--threads``); GPTQ W4A4 on SmolLM2-135M with 16 × 512 calibration tokens takes
minutes. It is a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = Path("/work/venv-llmc")
TORCH_PIN = "torch==2.13.0"
LLMC_PIN = "llmcompressor==0.14.0.1"
DEFAULT_SCHEMES = ("fp32", "w8a8-rtn", "w4a16-rtn", "w4a16-gptq", "w4a4-rtn", "w4a4-gptq", "w4a4-spinquant-gptq")
SPEECH_DEFAULT_SCHEMES = ("fp32", "w8a8-rtn", "w4a16-rtn", "w4a16-gptq", "w4a4-rtn", "w4a4-gptq")
SPEECH = "speech-asr"
N_ALSA = 8   # SpeechASRTask.eval_items: the 8 ALSA clips first, then the text-to-speech sentences
#: the output head each task leaves in full precision (ours and the peer's)
HEAD = {"text-lm": "lm_head", SPEECH: "proj_out"}
#: llm-compressor's calibration pipeline for Whisper: its sequential tracer cannot split Whisper (module docstring)
SPEECH_PIPELINE = "basic"

# name -> (weight bits, activation bits, weight method, transform before quantization)
SCHEMES: dict[str, dict] = {
    "fp32": {"w_bits": 16, "a_bits": 16, "method": None, "transform": None},
    "w8a8-rtn": {"w_bits": 8, "a_bits": 8, "method": "rtn", "transform": None},
    "w4a16-rtn": {"w_bits": 4, "a_bits": 16, "method": "rtn", "transform": None},
    "w4a16-gptq": {"w_bits": 4, "a_bits": 16, "method": "gptq", "transform": None},
    "w4a16-awq": {"w_bits": 4, "a_bits": 16, "method": "rtn", "transform": "awq"},
    "w4a4-rtn": {"w_bits": 4, "a_bits": 4, "method": "rtn", "transform": None},
    "w4a4-gptq": {"w_bits": 4, "a_bits": 4, "method": "gptq", "transform": None},
    "w4a4-spinquant-gptq": {"w_bits": 4, "a_bits": 4, "method": "gptq", "transform": "spinquant"},
    "w4a4-smoothquant-gptq": {"w_bits": 4, "a_bits": 4, "method": "gptq", "transform": "smoothquant"},
}


class PeerError(RuntimeError):
    """A problem the user can fix (bad scheme name, failed install, missing model); shown as one line."""


# ----------------------------------------------------------------------------------------------------------
# Pure helpers (no torch at import time; unit-tested in tests/scripts/test_peer_llmcompressor.py)
# ----------------------------------------------------------------------------------------------------------

def parse_schemes(text: str) -> list[str]:
    """``"w4a4-rtn, w4a4-gptq"`` -> ``["w4a4-rtn", "w4a4-gptq"]`` (order kept, duplicates dropped)."""
    names = []
    for part in text.split(","):
        name = part.strip()
        if not name:
            continue
        if name not in SCHEMES:
            raise PeerError(f"unknown scheme {name!r}; choose from {', '.join(SCHEMES)}")
        if name not in names:
            names.append(name)
    if not names:
        raise PeerError(f"--schemes is empty; choose from {', '.join(SCHEMES)}")
    return names


def scheme_formats(name: str, group_size: int) -> tuple[str, str]:
    """Human labels of the weight and activation formats, e.g. ``("W4g64", "A4-token")``."""
    s = SCHEMES[name]
    if s["method"] is None:
        return "fp32", "fp32"
    w = "W8-channel" if s["w_bits"] == 8 else f"W{s['w_bits']}g{group_size}"
    a = "A16" if s["a_bits"] == 16 else f"A{s['a_bits']}-token"
    return w, a


def check_group_size(widths: list[int], group_size: int) -> None:
    """Group quantization needs ``group_size`` to divide every input width of a quantized Linear."""
    bad = sorted({w for w in widths if w % group_size})
    if bad:
        raise PeerError(f"--group-size {group_size} does not divide the input widths {bad} of this model; "
                        "choose a divisor of every width (64 works for SmolLM2-135M and Qwen2.5-0.5B)")


def tensor_sha256(t) -> str:
    """SHA-256 of a tensor's shape, dtype and contiguous bytes (identifies a window or feature set)."""
    h = hashlib.sha256()
    h.update(f"{tuple(t.shape)}|{t.dtype}".encode())
    h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def export_windows(path: Path, calibration, evaluation, meta: dict) -> dict:
    """Write both window sets (int64 ``[n, T]``) to one safetensors file, atomically; return its metadata.

    The metadata (all strings) holds ``meta`` plus the SHA-256 of each set, so a reader can prove it
    scores the same tokens."""
    import torch
    from safetensors.torch import save_file

    for name, t in (("calibration", calibration), ("evaluation", evaluation)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype != torch.long:
            raise PeerError(f"{name} windows must be an int64 tensor [n, T], got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    full = {k: str(v) for k, v in meta.items()}
    full["calibration_sha256"] = tensor_sha256(calibration)
    full["evaluation_sha256"] = tensor_sha256(evaluation)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"calibration": calibration.clone(), "evaluation": evaluation.clone()}, str(tmp),
              metadata=full)
    os.replace(tmp, path)
    return full


def load_windows(path: Path) -> tuple[object, object, dict]:
    """``(calibration, evaluation, metadata)`` from :func:`export_windows`; checks both digests."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise PeerError(f"window file {path} does not exist; run the driver (without _worker) to export it")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    t = load_file(str(path))
    for name in ("calibration", "evaluation"):
        if tensor_sha256(t[name]) != meta.get(f"{name}_sha256"):
            raise PeerError(f"{path}: the {name} windows do not match their recorded SHA-256; delete the file "
                            "and run the driver again")
    return t["calibration"], t["evaluation"], meta


def _speech_digests(t: dict, references: list[str], prompt_ids: list[int]) -> tuple[str, str]:
    """(calibration, evaluation) SHA-256 of a speech data set: the calibration digest covers its features, padded
    decoder ids and lengths; the evaluation digest its features, the reference transcripts and the prompt."""
    cal = hashlib.sha256()
    for k in ("calibration_features", "calibration_decoder_ids", "calibration_lengths"):
        cal.update(f"{k}:{tensor_sha256(t[k])}|".encode())
    ev = hashlib.sha256()
    ev.update(f"evaluation_features:{tensor_sha256(t['evaluation_features'])}|".encode())
    ev.update(json.dumps({"references": list(references), "prompt_ids": list(prompt_ids)}).encode())
    return cal.hexdigest(), ev.hexdigest()


def export_speech(path: Path, calib_features, calib_ids: list, eval_features, references: list[str],
                  prompt_ids: list[int], meta: dict) -> dict:
    """Write a Whisper data set to one safetensors file, atomically; return its metadata (all strings).

    ``calib_features`` float32 ``[n, mels, frames]``; ``calib_ids`` ``n`` int64 token vectors (prompt + transcript
    + eos; stored right-padded with 0 as ``calibration_decoder_ids`` ``[n, L]`` with ``calibration_lengths``
    ``[n]``); ``eval_features`` float32 ``[m, mels, frames]``; ``references`` ``m`` transcripts and the forced
    decoder ``prompt_ids`` go to the metadata as JSON. ``calibration_sha256`` / ``evaluation_sha256`` cover all
    of it (:func:`_speech_digests`)."""
    import torch
    from safetensors.torch import save_file

    for name, t in (("calibration", calib_features), ("evaluation", eval_features)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.dtype != torch.float32:
            raise PeerError(f"{name} features must be a float32 tensor [n, mels, frames], got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    ids = [torch.as_tensor(i).reshape(-1) for i in calib_ids]
    if len(ids) != calib_features.shape[0] or any(i.dtype != torch.long or i.numel() == 0 for i in ids):
        raise PeerError(f"need one non-empty int64 decoder id vector per calibration utterance "
                        f"({calib_features.shape[0]}), got {len(ids)}")
    if isinstance(references, str) or len(references) != eval_features.shape[0] \
            or not all(isinstance(r, str) for r in references):
        raise PeerError(f"need one reference transcript (str) per evaluation utterance ({eval_features.shape[0]})")
    lengths = torch.tensor([i.numel() for i in ids], dtype=torch.long)
    padded = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for k, i in enumerate(ids):
        padded[k, :i.numel()] = i
    t = {"calibration_features": calib_features.contiguous().clone(), "calibration_decoder_ids": padded,
         "calibration_lengths": lengths, "evaluation_features": eval_features.contiguous().clone()}
    full = {k: str(v) for k, v in meta.items()}
    full["references"] = json.dumps(list(references))
    full["prompt_ids"] = json.dumps([int(x) for x in prompt_ids])
    full["calibration_sha256"], full["evaluation_sha256"] = _speech_digests(t, references, prompt_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(t, str(tmp), metadata=full)
    os.replace(tmp, path)
    return full


def load_speech(path: Path) -> tuple[list[dict], object, list[str], dict]:
    """``(calibration samples, evaluation features, references, metadata)`` from :func:`export_speech`; checks
    both digests. Each calibration sample is ``{"input_features": [1, mels, frames], "decoder_input_ids":
    [1, L_i]}`` (unpadded), as ``SpeechASRTask.calibration_samples`` gives them."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise PeerError(f"data file {path} does not exist; run the driver (without _worker) to export it")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    t = load_file(str(path))
    try:
        references = json.loads(meta["references"])
        prompt_ids = json.loads(meta["prompt_ids"])
        digests = _speech_digests(t, references, prompt_ids)
    except (KeyError, ValueError) as e:
        raise PeerError(f"{path} is not a speech data file of this script ({type(e).__name__}: {e}); delete it "
                        "and run the driver again") from e
    for name, d in zip(("calibration", "evaluation"), digests):
        if d != meta.get(f"{name}_sha256"):
            raise PeerError(f"{path}: the {name} data do not match their recorded SHA-256; delete the file and "
                            "run the driver again")
    calib = [{"input_features": t["calibration_features"][k:k + 1],
              "decoder_input_ids": t["calibration_decoder_ids"][k:k + 1, :int(n)]}
             for k, n in enumerate(t["calibration_lengths"].tolist())]
    return calib, t["evaluation_features"], references, meta


def score_speech_row(row: dict, references: list[str], decode) -> dict:
    """A worker's Whisper row scored in our environment: its ``hypothesis_tokens`` decoded with ``decode``
    (our tokenizer), then ``wer`` (all utterances), ``wer_alsa`` (the first :data:`N_ALSA`) and ``wer_tts`` (the
    rest) with our ``word_error_rate``. ``peer_decode_agrees`` tells whether the peer's own decoding gave the same
    text."""
    from morphoquant.eval.wer import word_error_rate

    tokens = row["hypothesis_tokens"]
    if len(tokens) != len(references):
        raise PeerError(f"{row.get('recipe')}: {len(tokens)} hypotheses for {len(references)} references")
    hyps = [decode(t) for t in tokens]
    out = dict(row)
    out["peer_decode_agrees"] = hyps == row.get("hypotheses")
    out["hypotheses"] = hyps
    out["wer"] = word_error_rate(references, hyps)
    out["wer_alsa"] = word_error_rate(references[:N_ALSA], hyps[:N_ALSA])
    out["wer_tts"] = word_error_rate(references[N_ALSA:], hyps[N_ALSA:]) if len(references) > N_ALSA else None
    return out


def row_metric(meta: dict) -> str:
    """The key of a row's score: ``wer`` for Whisper runs, ``ppl`` otherwise (rows of earlier runs have no
    ``task`` in their metadata: perplexity)."""
    return "wer" if meta.get("task") == SPEECH else "ppl"


def _load_repo_module(name: str, rel_path: str):
    """A stand-alone module of this repository loaded from its file, without importing the package (the
    peer's venv does not have morphoquant installed). Registered in ``sys.modules`` (dataclasses need it)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / rel_path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def atomic_write_text(path: Path, text: str) -> None:
    """Our project's atomic writer, loaded from its file (this script also runs in the peer's venv)."""
    _load_repo_module("_mq_atomic", "src/morphoquant/utils/atomic.py").atomic_write_text(Path(path), text)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def table_markdown(rows: list[dict], meta: dict) -> str:
    """The results as Markdown: one row per scheme, then the protocol, command and versions."""
    key = row_metric(meta)
    speech = key == "wer"
    fp = next((r.get(key) for r in rows if r.get("scheme") == "fp32" and r.get(key) is not None), None)
    lines = [f"# llm-compressor on {meta.get('model')}, scored by MorphoQuant's evaluator", ""]
    if speech:
        n_eval = (meta.get("eval") or {}).get("utterances")
        lines += [(f"Word error rate (corpus-level, normalised) on {n_eval} utterances: WER ALSA = the "
                   f"{N_ALSA} real speech clips, WER TTS = the text-to-speech sentences."), "",
                  ("| recipe | weights | activations | word error rate | × FP | WER ALSA | WER TTS | calib s | "
                   "peak RSS MB: load + quantize | peak RSS MB: whole run (incl. eval) | act. quant check |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += [("| recipe | weights | activations | wiki ppl | × FP | calib s | peak RSS MB: load + quantize | "
                   "peak RSS MB: whole run (incl. eval) | act. quant check |"),
                  "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        chk = r.get("act_quant_check") or {}
        if r.get("error"):
            check = "failed: " + r["error"].splitlines()[-1][:120]
        elif chk:
            check = (f"active (vs W-only {chk['rel_vs_weight_only']:.3g}, vs expected {chk['rel_vs_expected']:.2g})"
                     if chk.get("input_quantized") else f"weights only ({chk['rel_vs_weight_only']:.2g})")
        else:
            check = ""
        ppl = r.get(key)
        xfp = ppl / fp if (ppl is not None and fp) else None
        subs = f"{_fmt(r.get('wer_alsa'))} | {_fmt(r.get('wer_tts'))} | " if speech else ""
        lines.append(f"| {r['recipe']} | {r.get('weights', '')} | {r.get('activations', '')} | {_fmt(ppl)} | "
                     f"{_fmt(xfp, 3)} | {subs}{_fmt(r.get('calib_seconds'), 3)} | "
                     f"{_fmt(r.get('peak_rss_mb_calib'), 4)} | {_fmt(r.get('peak_rss_mb'), 4)} | "
                     f"{check} |")
    fp_ours = meta.get("fp_wer_ours" if speech else "fp_ppl_ours")
    agree = f" (peer environment: {_fmt(fp, 6)}, ratio {fp / fp_ours:.6f})" if fp and fp_ours else ""
    if speech:
        fp_row = next((r for r in rows if r.get("scheme") == "fp32" and r.get("hypotheses")), None)
        same = ""
        if fp_row is not None and meta.get("fp_hypotheses_ours"):
            n_same = sum(a == b for a, b in zip(fp_row["hypotheses"], meta["fp_hypotheses_ours"]))
            same = f"; identical FP transcripts: {n_same} of {len(fp_row['hypotheses'])}"
        lines += ["", (f"FP word error rate in our environment (`SpeechASRTask.evaluate`): "
                       f"{_fmt(fp_ours, 6)}{agree}{same}")]
    else:
        lines += ["", f"FP perplexity in our environment (`TextLMTask.evaluate`): {_fmt(fp_ours, 6)}{agree}"]
    lines += ["", "Calibration: " + json.dumps(meta.get("calib")), "", "Evaluation: " + json.dumps(meta.get("eval")),
              "", f"Command: `{meta.get('command')}`", "",
              "Versions (ours): " + ", ".join(f"{k} {v}" for k, v in (meta.get("versions_ours") or {}).items()),
              "", "Versions (peer): " + ", ".join(f"{k} {v}" for k, v in (meta.get("versions_peer") or {}).items())]
    return "\n".join(lines) + "\n"


def write_table(out: Path, rows: list[dict], meta: dict) -> None:
    """``peer.json`` (``{"meta", "rows"}``) and ``peer.md`` in ``out``, atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "peer.json", json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    atomic_write_text(out / "peer.md", table_markdown(rows, meta))


def previous_rows(path: Path, meta: dict) -> dict[str, dict]:
    """The successful rows of an earlier ``peer.json`` by scheme, if it was measured on the same model, windows
    and group size as ``meta``; ``{}`` otherwise (then every scheme runs again)."""
    if not Path(path).exists():
        return {}
    old = json.loads(Path(path).read_text())
    keys = ("calibration_sha256", "evaluation_sha256", "group_size", "model")
    if any(old.get("meta", {}).get(k) != meta.get(k) for k in keys):
        return {}
    return {r["scheme"]: r for r in old.get("rows", []) if not r.get("error") and r.get("scheme") in SCHEMES}


# ----------------------------------------------------------------------------------------------------------
# Driver (our venv)
# ----------------------------------------------------------------------------------------------------------

def ensure_venv(venv: Path) -> Path:
    """The peer's interpreter, creating the venv and installing the pinned packages if it has no llmcompressor."""
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import llmcompressor, compressed_tensors, transformers, torch"]
    if py.exists() and subprocess.run(probe, check=False, capture_output=True).returncode == 0:
        return py
    print(f"creating the llm-compressor environment in {venv} (several minutes)", file=sys.stderr, flush=True)
    steps = [[sys.executable, "-m", "venv", str(venv)]] if not py.exists() else []
    # torch pinned in both commands: otherwise pip resolves a multi-GB CUDA torch.
    steps += [[str(py), "-m", "pip", "install", "-q", TORCH_PIN],
              [str(py), "-m", "pip", "install", "-q", TORCH_PIN, LLMC_PIN]]
    for cmd in steps:
        r = subprocess.run(cmd, check=False)
        if r.returncode != 0:
            raise PeerError(f"`{' '.join(cmd)}` failed (exit {r.returncode}); fix the cause shown above, or delete "
                            f"{venv} and run again")
    if subprocess.run(probe, check=False, capture_output=True).returncode != 0:
        raise PeerError(f"{venv} still cannot import llmcompressor after installing; delete it and run again")
    return py


def _git_commit() -> str:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=False, capture_output=True,
                       text=True)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def model_task(model) -> str:
    """``speech-asr`` for a Whisper model (``model_type`` ``whisper`` in its config.json), else ``text-lm``."""
    from morphoquant.zoo.registry import resolve_model

    cfg = Path(resolve_model(model)) / "config.json"
    try:
        mtype = json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError):
        mtype = None
    return SPEECH if mtype == "whisper" else "text-lm"


def check_schemes_for_task(schemes: list[str], task: str) -> None:
    """Refuse schemes llm-compressor cannot apply to this kind of model (module docstring)."""
    if task == SPEECH:
        bad = [s for s in schemes if SCHEMES[s]["transform"] == "spinquant"]
        if bad:
            raise PeerError(f"{', '.join(bad)}: llm-compressor's SpinQuant has only Llama-style mappings (RMSNorm "
                            "input_layernorm / post_attention_layernorm, o_proj, up/gate/down_proj, lm_head); "
                            "Whisper's LayerNorms with bias, out_proj, fc1/fc2 and encoder-decoder stacks match "
                            "none of them. Drop it from --schemes")
        bad = [s for s in schemes if SCHEMES[s]["transform"] == "awq"]
        if bad:
            raise PeerError(f"{', '.join(bad)}: llm-compressor's AWQ registers no mappings for "
                            "WhisperForConditionalGeneration (its defaults are Llama-style layer names). "
                            "Drop it from --schemes")


def _base_meta(args, model_dir, data: dict, digests: dict) -> dict:
    return {"model": args.model, "model_dir": str(model_dir), **data, **digests,
            "group_size": args.group_size, "threads": args.threads,
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def prepare_speech(args, out: Path) -> tuple[dict, object]:
    """Whisper: export the calibration and evaluation data, score FP in our environment; returns the run's
    metadata and the row scorer (:func:`score_speech_row` with our tokenizer and the references)."""
    import torch

    from morphoquant.eval.tasks import SpeechASRTask
    from morphoquant.eval.wer import (
        transcribe_whisper_features,
        whisper_features,
        whisper_prompt_ids,
        word_error_rate,
    )
    from morphoquant.pipeline.runner import environment_versions
    from morphoquant.zoo import load_model
    from morphoquant.zoo.registry import resolve_model

    model_dir = resolve_model(args.model)
    model, proc = load_model(args.model)
    widths = sorted({m.in_features for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != HEAD[SPEECH]})
    check_group_size(widths, args.group_size)
    task = SpeechASRTask(proc, eval_sentences=args.eval_size)
    t = time.time()
    # exactly what `morphoquant compare whisper-tiny.en --calib N --eval-size K` (seed S) feeds and scores
    samples = task.calibration_samples(args.calib, 0, args.seed)
    items = task.eval_items()
    references = [r for r, _ in items]
    eval_features = whisper_features(proc.feature_extractor, [w for _, w in items])
    prompt = whisper_prompt_ids(proc.tokenizer, model)
    print(f"speech data built ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
    data = {"task": SPEECH, "metric": "wer",
            "calib": {"split": "wiki calibration sentences, text-to-speech (espeak-ng, 4 voices / speeds)",
                      "utterances": len(samples), "seed": args.seed, "decoder_inputs": "prompt + transcript + eos"},
            "eval": {"split": "8 ALSA speech clips + text-to-speech of wiki evaluation sentences",
                     "utterances": len(items), "alsa": N_ALSA, "tts": len(items) - N_ALSA,
                     "decoding": "greedy, forced prompt, <= 64 new tokens"}}
    wmeta = export_speech(out / "speech.safetensors", torch.cat([s["input_features"] for s in samples]).float(),
                          [s["decoder_input_ids"][0] for s in samples], eval_features, references, prompt,
                          {"model": args.model, **data})
    t = time.time()
    fp = task.evaluate(model, progress=False)
    # the same model on the exported features must transcribe identically (the file holds the task's data)
    hyps = transcribe_whisper_features(model, proc.tokenizer, eval_features)
    fp_export = word_error_rate(references, hyps)
    if fp_export != fp["wer"]:
        raise PeerError(f"FP WER on the exported features ({fp_export}) differs from SpeechASRTask.evaluate "
                        f"({fp['wer']}): the exported evaluation features are not the task's")
    print(f"FP32 WER in our environment: {fp['wer']:.4f} (alsa {fp['wer_alsa']:.4f}, tts {fp['wer_tts']:.4f}; "
          f"{time.time() - t:.0f} s)", file=sys.stderr, flush=True)
    del model
    tok = proc.tokenizer
    meta = {**_base_meta(args, model_dir, data, {k: wmeta[k] for k in ("calibration_sha256", "evaluation_sha256")}),
            "fp_wer_ours": fp["wer"], "fp_wer_alsa_ours": fp["wer_alsa"], "fp_wer_tts_ours": fp["wer_tts"],
            "fp_hypotheses_ours": hyps, "prompt_ids": prompt,
            "versions_ours": {**environment_versions(), "git": _git_commit()}}

    def scorer(row: dict) -> dict:
        return score_speech_row(row, references, lambda ids: tok.decode(ids, skip_special_tokens=True).strip())
    return meta, scorer


def prepare(args, out: Path) -> dict:
    """Export the windows and score FP in our environment; returns the run's metadata."""
    import torch

    from morphoquant.data import evaluation_windows
    from morphoquant.eval.tasks import TextLMTask
    from morphoquant.pipeline.runner import environment_versions
    from morphoquant.zoo import load_model
    from morphoquant.zoo.registry import resolve_model

    model_dir = resolve_model(args.model)
    model, tok = load_model(args.model)
    widths = sorted({m.in_features for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")})
    check_group_size(widths, args.group_size)
    task = TextLMTask(tok, eval_windows=args.eval_size, seq_len=args.seq_len)
    # exactly what `morphoquant quantize --calib N --seq-len L --seed S --eval-size K` feeds and scores
    calib = torch.cat([s["input_ids"] for s in task.calibration_samples(args.calib, args.seq_len, args.seed)])
    evalw = evaluation_windows(tok, args.seq_len, args.eval_size)
    data = {"calib": {"split": "wiki calibration (first 2000 articles by key)", "windows": args.calib,
                      "seq_len": args.seq_len, "seed": args.seed},
            "eval": {"split": "wiki evaluation (last 400 articles by key)", "windows": int(evalw.shape[0]),
                     "seq_len": args.seq_len, "first_windows": True}}
    wmeta = export_windows(out / "windows.safetensors", calib, evalw, {"model": args.model, **data})
    t = time.time()
    fp = task.evaluate(model, progress=False)["wiki_ppl"]
    print(f"FP32 wiki ppl in our environment: {fp:.4f} ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
    del model
    return {"model": args.model, "model_dir": str(model_dir), **data, "fp_ppl_ours": fp,
            "calibration_sha256": wmeta["calibration_sha256"], "evaluation_sha256": wmeta["evaluation_sha256"],
            "group_size": args.group_size, "threads": args.threads,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "versions_ours": {**environment_versions(), "git": _git_commit()}}


def run_scheme(py: Path, out: Path, scheme: str, meta: dict, args, scorer=None) -> dict:
    """One peer process for ``scheme``; returns its row (with ``error`` set when the process failed).
    ``scorer`` (Whisper) turns the worker's hypotheses into word error rates in our environment."""
    speech = meta.get("task") == SPEECH
    key = row_metric(meta)
    job = {"scheme": scheme, "model_dir": meta["model_dir"], "task": meta.get("task", "text-lm"),
           "windows": str(out / ("speech.safetensors" if speech else "windows.safetensors")),
           "group_size": args.group_size, "threads": args.threads, "seed": args.seed,
           "row_path": str(out / "rows" / f"{scheme}.json")}
    (out / "rows").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    job_path = out / "rows" / f"{scheme}.job.json"
    atomic_write_text(job_path, json.dumps(job, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ""}
    print(f"== {scheme}: running llm-compressor (log {out / 'logs' / (scheme + '.log')})", file=sys.stderr,
          flush=True)
    t = time.time()
    with open(out / "logs" / f"{scheme}.log", "w") as log:
        r = subprocess.run([str(py), str(Path(__file__).resolve()), "_worker", str(job_path)], check=False,
                           env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
    row_path = Path(job["row_path"])
    if r.returncode != 0 or not row_path.exists():
        tail = (out / "logs" / f"{scheme}.log").read_text(errors="replace").strip().splitlines()[-5:]
        w, a = scheme_formats(scheme, args.group_size)
        row = {"recipe": f"llmc-{scheme}", "scheme": scheme, "weights": w, "activations": a, key: None,
               "model": meta["model"], "calib": meta["calib"], "eval": meta["eval"],
               "error": f"exit {r.returncode}:\n" + "\n".join(tail)}
    else:
        row = json.loads(row_path.read_text())
        if scorer is not None:
            row = scorer(row)
    row["wall_seconds"] = time.time() - t
    row["command"] = meta["command"]  # kept rows of earlier runs keep the command that produced them
    print(f"   {scheme}: {key} {row.get(key)}  ({row['wall_seconds']:.0f} s)", file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        return worker(Path(argv[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="zoo name or local HF directory")
    p.add_argument("--schemes", default=None,
                   help=f"comma list from {', '.join(SCHEMES)} (default: {','.join(DEFAULT_SCHEMES)}; Whisper: "
                        f"{','.join(SPEECH_DEFAULT_SCHEMES)})")
    p.add_argument("--calib", type=int, default=16,
                   help="calibration windows / utterances (as morphoquant quantize --calib)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration and evaluation window length (LMs)")
    p.add_argument("--eval-size", type=int, default=None,
                   help="evaluation windows (default 8); Whisper: text-to-speech sentences besides the 8 ALSA "
                        "clips (default 16)")
    p.add_argument("--seed", type=int, default=0, help="calibration window seed (as morphoquant quantize --seed)")
    p.add_argument("--group-size", type=int, default=64, help="int4 weight group size (64 = ours)")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of the peer process")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="llm-compressor virtual environment")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/peer-llmc/MODEL)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds allowed per scheme")
    p.add_argument("--overwrite", action="store_true", help="re-run schemes that already have a row")
    args = p.parse_args(argv)
    try:
        task = model_task(args.model)
        speech = task == SPEECH
        schemes = parse_schemes(args.schemes or ",".join(SPEECH_DEFAULT_SCHEMES if speech else DEFAULT_SCHEMES))
        check_schemes_for_task(schemes, task)
        if args.eval_size is None:
            args.eval_size = 16 if speech else 8
        out = args.out or REPO / "runs" / "peer-llmc" / Path(str(args.model)).name
        py = ensure_venv(args.venv)
        import torch
        torch.set_num_threads(args.threads)
        scorer = None
        if speech:
            meta, scorer = prepare_speech(args, out)
        else:
            meta = prepare(args, out)
        prev = previous_rows(out / "peer.json", meta)
        # rows of schemes not asked for this time (same windows) stay in the table; rows in SCHEMES order
        order = [s for s in SCHEMES if s in schemes or s in prev]
        meta["schemes"] = order
        done: dict[str, dict] = {}
        for s in schemes:
            if s in prev and not args.overwrite:
                print(f"== {s}: kept from {out / 'peer.json'} (--overwrite re-runs it)", file=sys.stderr)
                done[s] = prev[s]
            else:
                done[s] = run_scheme(py, out, s, meta, args, scorer)
            rows = [done.get(x) or prev[x] for x in order if x in done or x in prev]
            meta["versions_peer"] = next((r["versions"] for r in rows if r.get("versions")), None)
            write_table(out, rows, meta)
        print(table_markdown(rows, meta))
        print(f"written: {out / 'peer.md'}, {out / 'peer.json'}", file=sys.stderr)
        return 1 if any(r.get("error") for r in done.values()) else 0
    except PeerError as e:
        print(f"peer_llmcompressor: {e}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------------------------
# Worker (the peer's venv: torch, transformers 5.17, llmcompressor; never imports morphoquant)
# ----------------------------------------------------------------------------------------------------------

def _our_perplexity_module():
    """``src/morphoquant/eval/perplexity.py`` loaded from its file: the exact evaluator of our pipeline."""
    return _load_repo_module("_mq_perplexity", "src/morphoquant/eval/perplexity.py")


def _our_wer_module():
    """``src/morphoquant/eval/wer.py`` loaded from its file (greedy Whisper decoding; needs torch and numpy)."""
    return _load_repo_module("_mq_wer", "src/morphoquant/eval/wer.py")


def llmc_modifiers(scheme: str, group_size: int, head: str = "lm_head") -> list:
    """llm-compressor modifiers for ``scheme``: every Linear except the output head ``head``."""
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    s = SCHEMES[scheme]
    ignore = [head]
    if s["w_bits"] == 8:
        quant = {"scheme": "W8A8", "targets": ["Linear"], "ignore": ignore}
    else:
        group = {"targets": ["Linear"],
                 "weights": QuantizationArgs(num_bits=s["w_bits"], type="int", symmetric=True, strategy="group",
                                             group_size=group_size, dynamic=False)}
        if s["a_bits"] < 16:
            group["input_activations"] = QuantizationArgs(num_bits=s["a_bits"], type="int", symmetric=True,
                                                          strategy="token", dynamic=True)
        quant = {"config_groups": {"group_0": group}, "ignore": ignore}
    mods = []
    if s["transform"] == "spinquant":
        from llmcompressor.modifiers.transform import SpinQuantModifier
        mods.append(SpinQuantModifier(rotations=["R1", "R2"], transform_type="random-hadamard"))
    elif s["transform"] == "smoothquant":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
        mods.append(SmoothQuantModifier(smoothing_strength=0.8))
    elif s["transform"] == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier
        mods.append(AWQModifier())
    mods.append(GPTQModifier(**quant) if s["method"] == "gptq" else QuantizationModifier(**quant))
    return mods


def _no_pinning_without_accelerator() -> None:
    """llm-compressor 0.14.0.1's AWQ pins its cached block inputs (``IntermediatesCache.pin_memory``) before the
    grid search, which raises ``Cannot access accelerator device when none is available`` on a CPU-only torch.
    Pinning only speeds up host-to-device copies, so without an accelerator it is skipped (values unchanged). The
    worker calls this before every ``oneshot``; schemes other than AWQ never pin."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def fake_quant_per_token(x, bits: int):
    """Symmetric per-token int-b fake quantization as compressed-tensors documents it:
    ``s = amax / ((2^b - 1) / 2)``, ``q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)``, result ``q * s``."""
    import torch
    amax = x.abs().amax(-1, keepdim=True).float()
    scale = (amax / ((2 ** bits - 1) / 2)).clamp(min=torch.finfo(torch.float32).eps)
    q = torch.clamp(torch.round(x.float() / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * scale).to(x.dtype)


def activation_quant_check(model, inputs: dict, head: str = "lm_head") -> dict:
    """Prove, on the first quantized Linear and one input (``model(**inputs)``: one window, or one utterance's
    features with the decoder prompt), whether its inputs are quantized (module docstring)."""
    import torch
    import torch.nn.functional as F
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    quantized = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and getattr(m, "quantization_scheme", None) is not None]
    if not quantized:
        raise RuntimeError("no Linear carries a quantization_scheme after oneshot")
    name, mod = quantized[0]
    seen = {}
    h = mod.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach().clone()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    x = seen["x"]
    scheme = mod.quantization_scheme
    with torch.no_grad():
        y = mod(x)
        w = mod.weight.data
        if scheme.weights is not None and mod.quantization_status < QuantizationStatus.COMPRESSED:
            w = forward_quantize(mod, w, "weight", scheme.weights)
        y_w = F.linear(x, w, mod.bias)
        acts = scheme.input_activations
        y_e = F.linear(fake_quant_per_token(x, acts.num_bits), w, mod.bias) if acts is not None else y_w

    def rel(a, b) -> float:
        return float((a - b).norm() / b.norm().clamp(min=1e-30))
    return {"module": name, "input_quantized": acts is not None,
            "input_args": acts.model_dump(mode="json") if acts is not None else None,
            "rel_vs_weight_only": rel(y, y_w), "rel_vs_expected": rel(y, y_e),
            "quantized_linears": len(quantized),
            "with_input_quant": sum(m.quantization_scheme.input_activations is not None for _, m in quantized),
            f"{head}_quantized": any(n.split(".")[-1] == head for n, _ in quantized)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process image in MiB (``VmHWM``): our ``utils/memory.py``, loaded from its file."""
    return _load_repo_module("_mq_memory", "src/morphoquant/utils/memory.py").peak_rss_mb()


def _record_embedding_inputs(model, seen_rows: list):
    """A pre-hook on the input embedding appending every token-id row it sees to ``seen_rows`` (which windows /
    utterances reached the model during ``oneshot``); returns the hook handle."""
    def record(module, args):  # the sequential pipeline also traces with meta tensors: skip those
        if not args[0].is_meta:
            seen_rows.extend(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
    return model.get_input_embeddings().register_forward_pre_hook(record)


def _peer_versions(torch, transformers, llmcompressor, compressed_tensors) -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
            "python": platform.python_version(), "threads": str(torch.get_num_threads())}


def worker_speech(job: dict) -> int:
    """Whisper: quantize with llm-compressor, transcribe the evaluation features greedily with our decoder, write
    the hypotheses (the driver computes the word error rates)."""
    import torch

    torch.set_num_threads(int(job["threads"]))
    torch.manual_seed(int(job["seed"]))
    import compressed_tensors
    import llmcompressor
    import transformers
    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    wer_mod = _our_wer_module()
    calib, eval_features, _references, wmeta = load_speech(Path(job["windows"]))
    prompt = json.loads(wmeta["prompt_ids"])
    scheme = job["scheme"]
    spec = SCHEMES[scheme]
    head = HEAD[SPEECH]
    t = time.time()
    model = WhisperForConditionalGeneration.from_pretrained(job["model_dir"], dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    load_s = time.time() - t
    if wer_mod.whisper_prompt_ids(tok, model) != prompt:
        raise RuntimeError(f"the peer's tokenizer gives the prompt {wer_mod.whisper_prompt_ids(tok, model)}, "
                           f"ours {prompt}")
    row: dict = {"recipe": f"llmc-{scheme}", "scheme": scheme}
    row["weights"], row["activations"] = scheme_formats(scheme, int(job["group_size"]))
    calib_s, seen_rows, mods = None, [], []
    if spec["method"] is not None:
        from llmcompressor import oneshot
        from torch.utils.data import DataLoader

        mods = llmc_modifiers(scheme, int(job["group_size"]), head=head)
        # RTN with dynamic activations is data-free in llm-compressor; GPTQ / transforms see our utterances.
        needs_data = spec["method"] == "gptq" or spec["transform"] is not None
        loader = DataLoader(calib, batch_size=None, shuffle=False) if needs_data else None
        # the decoder's token embedding: sees the decoder_input_ids
        h = _record_embedding_inputs(model, seen_rows)
        t = time.time()
        try:
            oneshot(model=model, tokenizer=job["model_dir"], recipe=mods, dataset=loader,
                    num_calibration_samples=len(calib), shuffle_calibration_samples=False,
                    **({"pipeline": SPEECH_PIPELINE} if needs_data else {}))
        finally:
            h.remove()
        calib_s = time.time() - t
        row["llmc_pipeline"] = SPEECH_PIPELINE if needs_data else "independent (data-free)"
        # oneshot leaves compressed-tensors' offload wrapper on every module; its `send_tensors` rebuilds dict
        # arguments as plain dicts, so WhisperModel.forward gets `encoder_outputs` (a BaseModelOutput) as a dict
        # and fails (`encoder_outputs[0]`: KeyError 0) in generate. Removing the (CPU -> CPU) dispatch keeps the
        # quantized forwards: the activation check below runs on the unwrapped model.
        from compressed_tensors.offload import remove_dispatch
        remove_dispatch(model)
    rss_calib = peak_rss_mb()
    check = None
    if spec["method"] is not None:
        check = activation_quant_check(model, {"input_features": eval_features[:1],
                                               "decoder_input_ids": torch.tensor([prompt])}, head=head)
    calib_set = {tuple(s["decoder_input_ids"][0].tolist()) for s in calib}
    seen_set = {tuple(r.tolist()) for r in seen_rows}
    t = time.time()
    texts, tokens = wer_mod.transcribe_whisper_features(model, tok, eval_features, return_tokens=True)
    row.update({
        "wer": None, "hypotheses": texts, "hypothesis_tokens": tokens, "model": wmeta.get("model"),
        "calib_seconds": calib_s, "eval_seconds": time.time() - t, "load_seconds": load_s,
        "peak_rss_mb": peak_rss_mb(), "peak_rss_mb_calib": rss_calib, "peak_rss_source": "VmHWM",
        # the decoder embedding's inputs during oneshot: which utterances reached the model, and are they ours?
        "calib_forward_calls": len(seen_rows), "calib_utterances_distinct_seen": len(seen_set),
        "calib_utterances_seen_are_ours": seen_set <= calib_set, "calib_utterances_all_used": seen_set == calib_set,
        "act_quant_check": check, "llmc_recipe": [repr(m) for m in mods],
        "calibration_sha256": wmeta["calibration_sha256"], "evaluation_sha256": wmeta["evaluation_sha256"],
        "versions": _peer_versions(torch, transformers, llmcompressor, compressed_tensors),
    })
    row["calib"] = {"utterances": len(calib), "used": bool(seen_rows), "sha256": wmeta["calibration_sha256"]}
    row["eval"] = {"utterances": int(eval_features.shape[0]), "sha256": wmeta["evaluation_sha256"]}
    atomic_write_text(Path(job["row_path"]), json.dumps(row, indent=2, default=str) + "\n")
    print(json.dumps({k: row[k] for k in ("recipe", "calib_seconds", "eval_seconds", "peak_rss_mb")}), flush=True)
    return 0


def worker(job_path: Path) -> int:
    """Quantize with llm-compressor and score with our perplexity in this (the peer's) process."""
    import torch

    job = json.loads(Path(job_path).read_text())
    if job.get("task") == SPEECH:
        return worker_speech(job)
    torch.set_num_threads(int(job["threads"]))
    torch.manual_seed(int(job["seed"]))
    import compressed_tensors
    import llmcompressor
    import transformers
    from transformers import AutoModelForCausalLM

    ppl_mod = _our_perplexity_module()
    calib, evalw, wmeta = load_windows(Path(job["windows"]))
    scheme = job["scheme"]
    spec = SCHEMES[scheme]
    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    model.eval()
    load_s = time.time() - t
    row: dict = {"recipe": f"llmc-{scheme}", "scheme": scheme}
    row["weights"], row["activations"] = scheme_formats(scheme, int(job["group_size"]))
    calib_s, seen_rows, mods = None, [], []
    if spec["method"] is not None:
        from llmcompressor import oneshot
        from torch.utils.data import DataLoader

        mods = llmc_modifiers(scheme, int(job["group_size"]))
        # RTN with dynamic activations is data-free in llm-compressor; GPTQ / transforms see our windows.
        needs_data = spec["method"] == "gptq" or spec["transform"] is not None
        loader = None
        if needs_data:
            items = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in calib]
            loader = DataLoader(items, batch_size=None, shuffle=False)
        _no_pinning_without_accelerator()
        h = _record_embedding_inputs(model, seen_rows)
        t = time.time()
        try:
            oneshot(model=model, tokenizer=job["model_dir"], recipe=mods, dataset=loader,
                    num_calibration_samples=int(calib.shape[0]), max_seq_length=int(calib.shape[1]),
                    shuffle_calibration_samples=False)
        finally:
            h.remove()
        calib_s = time.time() - t
    rss_calib = peak_rss_mb()
    check = activation_quant_check(model, {"input_ids": evalw[0][None]}) if spec["method"] is not None else None
    calib_set = {tuple(r.tolist()) for r in calib}
    seen_set = {tuple(r.tolist()) for r in seen_rows}
    t = time.time()
    res = ppl_mod.evaluate_perplexity(model, evalw, batch_size=4, progress=False)
    row.update({
        "ppl": res.ppl, "ppl_ci95": list(res.confidence_interval()), "eval_tokens": res.tokens,
        "model": wmeta.get("model"),
        "calib_seconds": calib_s, "eval_seconds": time.time() - t, "load_seconds": load_s,
        "peak_rss_mb": peak_rss_mb(), "peak_rss_mb_calib": rss_calib, "peak_rss_source": "VmHWM",
        # the embedding's inputs during oneshot: which distinct windows reached the model, and are they ours?
        "calib_forward_calls": len(seen_rows), "calib_windows_distinct_seen": len(seen_set),
        "calib_windows_seen_are_ours": seen_set <= calib_set, "calib_windows_all_used": seen_set == calib_set,
        "act_quant_check": check, "llmc_recipe": [repr(m) for m in mods],
        "calibration_sha256": wmeta["calibration_sha256"], "evaluation_sha256": wmeta["evaluation_sha256"],
        "versions": _peer_versions(torch, transformers, llmcompressor, compressed_tensors),
    })
    row["calib"] = {"windows": int(calib.shape[0]), "seq_len": int(calib.shape[1]), "used": bool(seen_rows),
                    "sha256": wmeta["calibration_sha256"]}
    row["eval"] = {"windows": int(evalw.shape[0]), "seq_len": int(evalw.shape[1]),
                   "sha256": wmeta["evaluation_sha256"]}
    atomic_write_text(Path(job["row_path"]), json.dumps(row, indent=2, default=str) + "\n")
    print(json.dumps({k: row[k] for k in ("recipe", "ppl", "calib_seconds", "peak_rss_mb")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation: perplexity, per-modality output fidelity against a reference model, Whisper WER."""
from morphoquant.eval.fidelity import FidelityReport, ModalityFidelity, default_hidden_states, output_fidelity
from morphoquant.eval.perplexity import PerplexityResult, evaluate_perplexity, perplexity
from morphoquant.eval.wer import normalize_transcript, transcribe_whisper, whisper_prompt_ids, word_error_rate

__all__ = [
    "FidelityReport",
    "ModalityFidelity",
    "PerplexityResult",
    "default_hidden_states",
    "evaluate_perplexity",
    "normalize_transcript",
    "output_fidelity",
    "perplexity",
    "transcribe_whisper",
    "whisper_prompt_ids",
    "word_error_rate",
]

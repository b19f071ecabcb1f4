import numpy as np
import pytest
import torch

from morphoquant.eval import normalize_transcript, transcribe_whisper, whisper_prompt_ids, word_error_rate


def test_normalisation_makes_case_and_punctuation_irrelevant():
    assert normalize_transcript("  Hello,   World! ") == "hello world"
    assert normalize_transcript("Don't stop—state-of-the-art.") == "dont stop state of the art"
    assert word_error_rate(["Hello, World!"], ["hello world"]) == 0.0


def test_one_substitution_in_four_words():
    assert word_error_rate(["the cat sat down"], ["the dog sat down"]) == pytest.approx(0.25)


def test_corpus_level_aggregation():
    # 1 error over 2 words + 1 error over 6 words = 2 / 8, not the mean of 0.5 and 1/6
    refs = ["a b", "c d e f g h"]
    hyps = ["a x", "c d e f g"]
    assert word_error_rate(refs, hyps) == pytest.approx(2 / 8)


def test_empty_reference_counts_insertions():
    assert word_error_rate(["...", "one two"], ["extra", "one two"]) == pytest.approx(0.5)


def test_wer_errors():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        word_error_rate(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no words"):
        word_error_rate(["!"], ["a"])


# ------------------------------------------------------------------------------------------ tiny whisper

SPECIALS = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]


def _tokenizer(multilingual: bool):
    from transformers import WhisperTokenizer

    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyzĠ")}
    vocab["<|endoftext|>"] = len(vocab)
    tok = WhisperTokenizer(vocab=vocab, merges=[])
    specials = SPECIALS if multilingual else [SPECIALS[0], SPECIALS[3]]
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


@pytest.fixture(scope="module")
def whisper():
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    tok = _tokenizer(multilingual=False)
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, encoder_layers=1, decoder_layers=1, d_model=16,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                        decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=32,
                        decoder_start_token_id=tok.convert_tokens_to_ids("<|startoftranscript|>"),
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                        bos_token_id=tok.eos_token_id, begin_suppress_tokens=None, init_std=0.5)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg).eval()
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(16000).astype(np.float32) * 0.1,
             np.sin(np.linspace(0, 2000, 8000)).astype(np.float32)]
    return model, WhisperFeatureExtractor(feature_size=80), tok, waves


def test_prompt_ids():
    en = _tokenizer(multilingual=False)
    assert whisper_prompt_ids(en) == en.convert_tokens_to_ids([SPECIALS[0], SPECIALS[3]])
    multi = _tokenizer(multilingual=True)
    assert whisper_prompt_ids(multi) == multi.convert_tokens_to_ids(SPECIALS)


@pytest.mark.parametrize("method", ["auto", "greedy"])
def test_transcribe_tiny_random_whisper(whisper, method):
    model, fe, tok, waves = whisper
    texts = transcribe_whisper(model, fe, tok, waves, max_new_tokens=6, method=method)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_greedy_loop_matches_generate(whisper):
    model, fe, tok, waves = whisper
    a = transcribe_whisper(model, fe, tok, waves, max_new_tokens=8, method="generate")
    b = transcribe_whisper(model, fe, tok, waves, max_new_tokens=8, method="greedy")
    assert a == b


def test_generate_does_not_warn_about_max_length(whisper, caplog):
    # Whisper checkpoints carry max_length=448 in their generation config; with max_new_tokens transformers
    # warned once per batch ("Both `max_new_tokens` ... and `max_length` ... seem to have been set")
    model, fe, tok, waves = whisper
    model.generation_config.max_length = 448
    try:
        with caplog.at_level("WARNING"):
            a = transcribe_whisper(model, fe, tok, waves, max_new_tokens=8, method="generate")
    finally:
        model.generation_config.max_length = 20
    assert "seem to have been set" not in caplog.text
    assert model.generation_config.max_length == 20
    assert a == transcribe_whisper(model, fe, tok, waves, max_new_tokens=8, method="greedy")


def test_generate_failure_falls_back_to_greedy(whisper, monkeypatch, caplog):
    model, fe, tok, waves = whisper
    expected = transcribe_whisper(model, fe, tok, waves[:1], max_new_tokens=5, method="greedy")

    def broken_generate(*args, **kwargs):
        raise ValueError("generation config is not properly set")

    monkeypatch.setattr(model, "generate", broken_generate)
    assert transcribe_whisper(model, fe, tok, waves[:1], max_new_tokens=5) == expected
    assert "falling back" in caplog.text
    with pytest.raises(ValueError, match="not properly set"):
        transcribe_whisper(model, fe, tok, waves[:1], max_new_tokens=5, method="generate")

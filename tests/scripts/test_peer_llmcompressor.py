"""The pure helpers of scripts/peer_llmcompressor.py (the llm-compressor run itself is a benchmark, not a test)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "peer_llmcompressor.py"


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("peer_llmcompressor_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_parse_schemes_keeps_order_and_drops_duplicates(peer):
    assert peer.parse_schemes(" w4a4-gptq, fp32,w4a4-gptq,") == ["w4a4-gptq", "fp32"]


@pytest.mark.parametrize("text", ["w4a4-awq", ""])
def test_parse_schemes_rejects_unknown_or_empty(peer, text):
    with pytest.raises(peer.PeerError, match="choose from"):
        peer.parse_schemes(text)


def test_scheme_formats(peer):
    assert peer.scheme_formats("w4a4-gptq", 64) == ("W4g64", "A4-token")
    assert peer.scheme_formats("w4a16-rtn", 128) == ("W4g128", "A16")
    assert peer.scheme_formats("w8a8-rtn", 64) == ("W8-channel", "A8-token")
    assert peer.scheme_formats("fp32", 64) == ("fp32", "fp32")


def test_group_size_must_divide_every_width(peer):
    peer.check_group_size([576, 1536], 64)
    with pytest.raises(peer.PeerError, match=r"\[576\]"):
        peer.check_group_size([576, 1536], 128)


def test_windows_round_trip_and_digest(peer, tmp_path):
    calib = torch.arange(12, dtype=torch.long).reshape(3, 4)
    evalw = torch.arange(100, 108, dtype=torch.long).reshape(2, 4)
    meta = peer.export_windows(tmp_path / "w.safetensors", calib, evalw, {"model": "m", "seed": 0})
    c, e, m = peer.load_windows(tmp_path / "w.safetensors")
    assert torch.equal(c, calib) and torch.equal(e, evalw)
    assert m["model"] == "m" and m["seed"] == "0"
    assert m["calibration_sha256"] == meta["calibration_sha256"] == peer.tensor_sha256(calib)
    # the digest depends on the shape, not only the bytes
    assert peer.tensor_sha256(calib) != peer.tensor_sha256(calib.reshape(4, 3))
    assert not list(tmp_path.glob(".*tmp*"))


def test_load_windows_detects_tampering(peer, tmp_path):
    from safetensors.torch import save_file
    calib = torch.zeros(2, 3, dtype=torch.long)
    meta = peer.export_windows(tmp_path / "w.safetensors", calib, calib, {})
    save_file({"calibration": calib + 1, "evaluation": calib.clone()}, str(tmp_path / "w.safetensors"), metadata=meta)
    with pytest.raises(peer.PeerError, match="calibration windows do not match"):
        peer.load_windows(tmp_path / "w.safetensors")


def test_export_windows_rejects_float_windows(peer, tmp_path):
    with pytest.raises(peer.PeerError, match="int64"):
        peer.export_windows(tmp_path / "w.safetensors", torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), {})


def test_fake_quant_per_token_hand_computed(peer):
    # amax 3, int4: scale = 3 / 7.5 = 0.4; x / s = 3.75, -7.5, 1.875 -> 4, -8 (half to even), 2
    x = torch.tensor([[1.5, -3.0, 0.75]])
    assert torch.allclose(peer.fake_quant_per_token(x, 4), torch.tensor([[1.6, -3.2, 0.8]]))
    # +amax maps to 7.5 -> rounds to 8 -> clamped to 7: 2.8, not 3
    assert torch.allclose(peer.fake_quant_per_token(torch.tensor([[3.0, -1.0]]), 4), torch.tensor([[2.8, -0.8]]))


def test_write_table(peer, tmp_path):
    rows = [{"recipe": "llmc-fp32", "scheme": "fp32", "weights": "fp32", "activations": "fp32", "ppl": 10.0},
            {"recipe": "llmc-w4a4-rtn", "scheme": "w4a4-rtn", "weights": "W4g64", "activations": "A4-token",
             "ppl": 50.0, "calib_seconds": 2.5, "peak_rss_mb": 1111.0, "peak_rss_mb_calib": 900.0,
             "act_quant_check": {"input_quantized": True, "rel_vs_weight_only": 0.15, "rel_vs_expected": 0.0}},
            {"recipe": "llmc-w4a4-gptq", "scheme": "w4a4-gptq", "ppl": None, "error": "exit 1:\nboom"}]
    meta = {"model": "tiny", "fp_ppl_ours": 10.0, "command": "x", "calib": {"windows": 2}}
    peer.write_table(tmp_path, rows, meta)
    data = json.loads((tmp_path / "peer.json").read_text())
    assert data["rows"][1]["ppl"] == 50.0 and data["meta"]["model"] == "tiny"
    md = (tmp_path / "peer.md").read_text()
    assert "| llmc-w4a4-rtn | W4g64 | A4-token | 50 | 5 | 2.5 | 900 | 1111 | active" in md
    assert "failed: boom" in md
    assert "ratio 1.000000" in md


def test_previous_rows_only_from_the_same_windows(peer, tmp_path):
    meta = {"model": "m", "group_size": 64, "calibration_sha256": "c", "evaluation_sha256": "e"}
    rows = [{"recipe": "llmc-fp32", "scheme": "fp32", "ppl": 10.0},
            {"recipe": "llmc-w4a4-gptq", "scheme": "w4a4-gptq", "ppl": None, "error": "exit 1"}]
    assert peer.previous_rows(tmp_path / "peer.json", meta) == {}
    peer.write_table(tmp_path, rows, meta)
    assert list(peer.previous_rows(tmp_path / "peer.json", meta)) == ["fp32"]  # failed rows run again
    assert peer.previous_rows(tmp_path / "peer.json", {**meta, "evaluation_sha256": "other"}) == {}
    assert peer.previous_rows(tmp_path / "peer.json", {**meta, "group_size": 128}) == {}


# ---------------------------------------------------------------------------------------------- Whisper (WER)

REPO = SCRIPT.parents[1]


def _speech_data():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 4, 6, generator=g)
    ids = [torch.tensor([50257, 50362, 11, 12, 50256]), torch.tensor([50257, 50362, 7, 50256])]
    evalf = torch.randn(3, 4, 6, generator=g)
    refs = ["Hello world.", "a b c", "The cat sat."]
    return feats, ids, evalf, refs, [50257, 50362]


def test_speech_round_trip(peer, tmp_path):
    feats, ids, evalf, refs, prompt = _speech_data()
    path = tmp_path / "speech.safetensors"
    meta = peer.export_speech(path, feats, ids, evalf, refs, prompt, {"model": "w", "task": "speech-asr"})
    calib, e, r, m = peer.load_speech(path)
    assert len(calib) == 2 and r == refs and torch.equal(e, evalf)
    for k, s in enumerate(calib):
        assert torch.equal(s["input_features"], feats[k:k + 1])
        assert torch.equal(s["decoder_input_ids"], ids[k][None])        # unpadded again
    assert m["model"] == "w" and json.loads(m["prompt_ids"]) == prompt
    assert m["calibration_sha256"] == meta["calibration_sha256"] and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("what", ["features", "decoder_ids", "references"])
def test_speech_digest_detects_tampering(peer, tmp_path, what):
    from safetensors.torch import load_file, save_file
    feats, ids, evalf, refs, prompt = _speech_data()
    path = tmp_path / "speech.safetensors"
    meta = peer.export_speech(path, feats, ids, evalf, refs, prompt, {})
    t = load_file(str(path))
    if what == "features":
        t["evaluation_features"][0, 0, 0] += 1e-3
    elif what == "decoder_ids":
        t["calibration_decoder_ids"][1, 1] = 3
    else:
        meta = {**meta, "references": json.dumps(["Hello world.", "a b d", "The cat sat."])}
    save_file(t, str(path), metadata=meta)
    part = "calibration" if what == "decoder_ids" else "evaluation"
    with pytest.raises(peer.PeerError, match=f"{part} data do not match"):
        peer.load_speech(path)


def test_export_speech_rejects_bad_inputs(peer, tmp_path):
    feats, ids, evalf, refs, prompt = _speech_data()
    path = tmp_path / "speech.safetensors"
    with pytest.raises(peer.PeerError, match="float32"):
        peer.export_speech(path, feats.double(), ids, evalf, refs, prompt, {})
    with pytest.raises(peer.PeerError, match="one reference transcript"):
        peer.export_speech(path, feats, ids, evalf, refs[:2], prompt, {})
    with pytest.raises(peer.PeerError, match="decoder id vector"):
        peer.export_speech(path, feats, ids[:1], evalf, refs, prompt, {})


def test_score_speech_row(peer):
    refs = [f"clip {i}" for i in range(8)] + ["the cat sat", "a dog ran"]
    vocab = {1: "clip", 2: "the", 3: "cat", 4: "sat", 5: "a", 6: "dog", 7: "ran", 8: "hat"}
    tokens = [[1, 100 + i] for i in range(8)] + [[2, 8, 4], [5, 6, 7]]
    vocab.update({100 + i: str(i) for i in range(8)})
    row = {"recipe": "llmc-w4a4-rtn", "hypotheses": ["peer"] * 10, "hypothesis_tokens": tokens}
    out = peer.score_speech_row(row, refs, lambda ids: " ".join(vocab[i] for i in ids))
    assert out["wer_alsa"] == 0.0 and out["wer_tts"] == pytest.approx(1 / 6)   # cat -> hat
    assert out["wer"] == pytest.approx(1 / 22) and out["peer_decode_agrees"] is False
    assert out["hypotheses"][8] == "the hat sat" and "wer" not in row
    with pytest.raises(peer.PeerError, match="2 hypotheses for 10 references"):
        peer.score_speech_row({**row, "hypothesis_tokens": tokens[:2]}, refs, str)


def _wer_rows():
    return [{"recipe": "llmc-fp32", "scheme": "fp32", "weights": "fp32", "activations": "fp32", "wer": 0.25,
             "wer_alsa": 0.3, "wer_tts": 0.2, "hypotheses": ["a", "b"]},
            {"recipe": "llmc-w8a8-rtn", "scheme": "w8a8-rtn", "weights": "W8-channel", "activations": "A8-token",
             "wer": 0.22, "wer_alsa": 0.25, "wer_tts": 0.19, "calib_seconds": 1.5, "peak_rss_mb_calib": 500.0,
             "peak_rss_mb": 600.0,
             "act_quant_check": {"input_quantized": True, "rel_vs_weight_only": 0.01, "rel_vs_expected": 0.0}},
            {"recipe": "llmc-w4a4-gptq", "scheme": "w4a4-gptq", "weights": "W4g64", "activations": "A4-token",
             "wer": None, "error": "exit 1:\nTraceError: boom"}]


def _wer_meta():
    return {"model": "whisper-tiny.en", "task": "speech-asr", "metric": "wer", "fp_wer_ours": 0.25,
            "fp_hypotheses_ours": ["a", "c"], "command": "peer whisper", "eval": {"utterances": 2}}


def test_write_table_wer(peer, tmp_path):
    peer.write_table(tmp_path, _wer_rows(), _wer_meta())
    md = (tmp_path / "peer.md").read_text()
    assert "| recipe | weights | activations | word error rate | × FP | WER ALSA | WER TTS |" in md
    assert "| llmc-w8a8-rtn | W8-channel | A8-token | 0.22 | 0.88 | 0.25 | 0.19 | 1.5 | 500 | 600 | active" in md
    assert "failed: TraceError: boom" in md and "wiki ppl" not in md
    assert "FP word error rate in our environment (`SpeechASRTask.evaluate`): 0.25 (peer environment: 0.25, " \
           "ratio 1.000000); identical FP transcripts: 1 of 2" in md


def _merge_table():
    spec = importlib.util.spec_from_file_location("merge_table_under_test", REPO / "benchmarks" / "merge_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compare_run(d: Path, metric: str, rows: list):
    d.mkdir()
    (d / "compare.json").write_text(json.dumps({"meta": {"command": f"cmd {d.name}", "task": {"metric": metric}},
                                                "rows": rows}))


def test_wer_peer_rows_merge_into_a_wer_table(peer, tmp_path):
    mt = _merge_table()
    peer.write_table(tmp_path / "peer", _wer_rows(), _wer_meta())
    _compare_run(tmp_path / "w", "wer", [{"recipe": "fp32", "wer": 0.236},
                                         {"recipe": "rtn-w8a8", "weights": "W8", "activations": "A8-token",
                                          "wer": 0.222}])
    out = tmp_path / "t.md"
    mt.main([str(out), str(tmp_path / "w"), "--peer", str(tmp_path / "peer" / "peer.json")])
    text = out.read_text()
    assert "| llm-compressor rtn | 0.22 (0.93×) | – | – | – |" in text        # ratio to our FP 0.236
    assert "| rtn | 0.222 (0.94×) |" in text
    assert "gptq" not in text.split("Commands:")[0]                            # the failed row gives no cell


def test_peer_metric_mismatch_is_refused(peer, tmp_path):
    mt = _merge_table()
    peer.write_table(tmp_path / "peer", _wer_rows(), _wer_meta())
    _compare_run(tmp_path / "lm", "wiki_ppl", [{"recipe": "fp32", "wiki_ppl": 10.0}])
    with pytest.raises(SystemExit, match=r"peer rows are word error rates \(wer, .*the runs measure wiki_ppl"):
        mt.main([str(tmp_path / "t.md"), str(tmp_path / "lm"), "--peer", str(tmp_path / "peer" / "peer.json")])


def test_whisper_refuses_spinquant(peer):
    peer.check_schemes_for_task(["fp32", "w4a4-spinquant-gptq"], "text-lm")
    peer.check_schemes_for_task(["fp32", "w4a4-gptq"], "speech-asr")
    with pytest.raises(peer.PeerError, match="SpinQuant has only Llama-style mappings"):
        peer.check_schemes_for_task(["fp32", "w4a4-spinquant-gptq"], "speech-asr")


def test_whisper_refuses_awq(peer):
    peer.check_schemes_for_task(["fp32", "w4a16-awq"], "text-lm")
    with pytest.raises(peer.PeerError, match="AWQ registers no mappings for WhisperForConditionalGeneration"):
        peer.check_schemes_for_task(["w4a16-awq"], "speech-asr")


@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-0.5b"])
def test_committed_lm_tables_unchanged(peer, model):
    """The language-model peer tables of earlier runs still load, keep every successful row and render the
    same Markdown (the Whisper support leaves the perplexity format alone)."""
    path = REPO / "runs" / "peer-llmc" / model / "peer.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    data = json.loads(path.read_text())
    kept = peer.previous_rows(path, data["meta"])
    assert list(kept) == [r["scheme"] for r in data["rows"] if not r.get("error")]
    assert peer.row_metric(data["meta"]) == "ppl"
    assert peer.table_markdown(data["rows"], data["meta"]) == (path.parent / "peer.md").read_text()

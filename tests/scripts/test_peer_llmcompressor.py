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

"""benchmarks/merge_table.py: families, formats and the merged Markdown from hand-written compare.json files."""
import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "merge_table", Path(__file__).resolve().parents[2] / "benchmarks" / "merge_table.py")
mt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mt)


@pytest.mark.parametrize("recipe,family", [("gptq-w4a4", "gptq"), ("quarot-gptq-w4a4@w8a8", "quarot-gptq"),
                                           ("gptq@w8a8", "gptq"), ("rtn-w4a4-static", "rtn-static"),
                                           ("morpho-plus", "morpho-plus"), ("rtn-w8a8", "rtn")])
def test_family_drops_bit_widths(recipe, family):
    assert mt.family_of(recipe) == family


def test_format_from_bits_used():
    assert mt.format_of("W4g64+gptq", "A4-token") == "W4A4"
    assert mt.format_of("W8", "A16") == "W8A16"
    assert mt.format_of("", "") is None


def _write(d: Path, rows, metric="wiki_ppl"):
    d.mkdir()
    (d / "compare.json").write_text(json.dumps({"meta": {"command": f"cmd {d.name}", "task": {"metric": metric}},
                                                "rows": rows}))


def test_merge(tmp_path):
    _write(tmp_path / "a", [{"recipe": "fp32", "wiki_ppl": 10.0},
                            {"recipe": "gptq-w4a4", "weights": "W4g64", "activations": "A4-token",
                             "wiki_ppl": 40.0},
                            {"recipe": "gptq@w8a8", "weights": "W8", "activations": "A8-token", "wiki_ppl": 10.2,
                             "sanity": "ok"},
                            {"recipe": "morpho", "weights": "W4g64", "activations": "A4-channel",
                             "wiki_ppl": 30.0, "effective_act_bits": 4.5}])
    _write(tmp_path / "b", [{"recipe": "fp32", "wiki_ppl": 10.0},
                            {"recipe": "gptq-w4a4@w4a8", "weights": "W4g64", "activations": "A8-token",
                             "wiki_ppl": 11.0},
                            {"recipe": "gptq-w4a4", "weights": "W4g64", "activations": "A4-token", "wiki_ppl": 39.0}])
    out = tmp_path / "t.md"
    mt.main([str(out), str(tmp_path / "a"), str(tmp_path / "b")])
    text = out.read_text()
    assert "| gptq | 10.2 (1.02×) | 11 (1.10×) | – | 39 (3.90×) |" in text      # later run wins
    assert "| morpho | – | – | – | 30 (3.00×), 4.50 b |" in text
    assert "gptq W4A4: gptq-w4a4 (a) replaced by gptq-w4a4 (b)" in text
    assert "cmd a" in text and "cmd b" in text and not out.with_suffix(".md.tmp").exists()


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="compare.json not found"):
        mt.main([str(tmp_path / "t.md"), str(tmp_path / "nope")])


def test_peer_rows_join_the_table(tmp_path):
    _write(tmp_path / "a", [{"recipe": "fp32", "wiki_ppl": 10.0},
                            {"recipe": "rtn-w4a4", "weights": "W4g64", "activations": "A4-token", "wiki_ppl": 50.0}])
    peer = tmp_path / "peer.json"
    peer.write_text(json.dumps({"meta": {"command": "peer cmd"}, "rows": [
        {"recipe": "llmc-fp32", "scheme": "fp32", "weights": "fp32", "activations": "fp32", "ppl": 10.0},
        {"recipe": "llmc-w4a4-spinquant-gptq", "scheme": "w4a4-spinquant-gptq", "weights": "W4g64",
         "activations": "A4-token", "ppl": 20.0}]}))
    out = tmp_path / "t.md"
    mt.main([str(out), str(tmp_path / "a"), "--peer", str(peer)])
    assert "| llm-compressor spinquant-gptq | – | – | – | 20 (2.00×) |" in out.read_text()
    _write(tmp_path / "w", [{"recipe": "fp32", "wer": 0.2}], metric="wer")
    with pytest.raises(SystemExit, match="peer rows are wiki perplexities"):
        mt.main([str(out), str(tmp_path / "w"), "--peer", str(peer)])


def test_error_rows_read_not_applicable(tmp_path):
    _write(tmp_path / "a", [{"recipe": "fp32", "wer": 0.2},
                            {"recipe": "quarot-w4a4", "weights": "W4g64", "activations": "A4-token", "wer": None,
                             "error": "UnsupportedRotationError: no decoder"}], metric="wer")
    out = tmp_path / "t.md"
    mt.main([str(out), str(tmp_path / "a")])
    assert "| quarot | – | – | – | n/a (UnsupportedRotationError) |" in out.read_text()

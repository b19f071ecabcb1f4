"""morphoquant.report: the HTML report of a quantize/compare run (see conftest.py for the tiny-model run)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from morphoquant.report import ReportError, build_report, embedding_plot, load_run

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "screenshot_report.sh"
SECTIONS = ["results", "error", "bits", "activations", "outliers", "embeddings", "details"]
FULL_FIGURES = [
    "rel_error.png",
    "bits.png",
    "act_range-morpho.png",
    "kurtosis-morpho.png",
    "act_range-rtn-w4a4.png",
    "kurtosis-rtn-w4a4.png",
    "dispersion-morpho.png",
    "outliers-morpho.png",
    "clip-morpho.png",
    "embeddings.png",
]
EXTERNAL = re.compile(
    r"""(?:\b(?:src|href|srcset|action|data|poster)\s*=\s*["']?\s*(?:https?:)?//)"""
    r"""|(?:url\(\s*["']?\s*(?:https?:)?//)|(?:@import\s+["']?\s*(?:url\()?\s*["']?(?:https?:)?//)""",
    re.IGNORECASE,
)


def _html(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _warnings(html: str) -> list[str]:
    return re.findall(r'<p class="note warn">(.*?)</p>', html)


@pytest.fixture(scope="module")
def full_report(tiny_run_src, tmp_path_factory):
    """The tiny run (rtn-w4a4 + morpho, text/image/audio) with embeddings.png, reported once per module."""
    run = tmp_path_factory.mktemp("full") / "run"
    shutil.copytree(tiny_run_src[0], run)
    h = tiny_run_src[1]
    embedding_plot(h["fp_hidden"], h["q_hidden"], h["modality_ids"], run / "embeddings.png")
    index = build_report(run)
    return run, index, _html(index)


def _small_run(src: Path, dst: Path, recipes=("rtn-w4a4",), summary: bool = True) -> Path:
    """A copy of the tiny run with only some recipes (fewer figures: fast)."""
    dst.mkdir(parents=True)
    for r in recipes:
        shutil.copytree(src / r, dst / r)
    if summary:
        rows = json.loads((src / "summary.json").read_text())
        (dst / "summary.json").write_text(json.dumps([r for r in rows if r["recipe"] in ("fp32", *recipes)]))
    return dst


# ------------------------------------------------------------------------------------------- the full report


def test_full_report_sections_and_figures(full_report):
    run, index, html = full_report
    assert index == run / "report" / "index.html"
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in html
    for name in FULL_FIGURES:
        png = run / "report" / name
        assert png.is_file(), name
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 200
        assert f'src="{name}"' in html
    assert _warnings(html) == []
    # every modality of the calibration data, both recipes, the method-less recipe's note
    for word in ("text", "image", "audio", "rtn-w4a4", "morpho", "tiny:qwen2.5-omni-thinker"):
        assert word in html
    assert "has no dispersion / outlier / clip arrays" in html  # rtn-w4a4
    assert "No summary.json" not in html


def test_full_report_tables(full_report):
    run, _, html = full_report
    rows = json.loads((run / "summary.json").read_text())
    morpho = next(r for r in rows if r["recipe"] == "morpho")
    assert f"{morpho['top1_agree']:.4g}" in html
    assert f"{100 * morpho['outlier_channel_share']:.2f} %" in html  # 16-bit channel share as a percentage
    assert "Task results" in html and "logit_nmse" in html
    assert re.search(r'class="[^"]*\bbest\b', html)  # best quantized metric marked
    assert "Clip search loss per modality" in html


def test_no_network_references(full_report):
    _, index, html = full_report
    assert EXTERNAL.search(html) is None, EXTERNAL.search(html).group(0)
    assert "<script" not in html.lower() and "<link" not in html.lower() and "@font-face" not in html
    # every referenced resource is a local file in the report directory or an anchor
    for ref in re.findall(r'\b(?:src|href)="([^"]+)"', html):
        assert ref.startswith("#") or (index.parent / ref).is_file(), ref
    assert EXTERNAL.search('<img src="https://cdn.example/x.png">')  # the pattern itself works
    assert EXTERNAL.search("background: url(//cdn.example/a.woff)")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed")
def test_headless_chromium_screenshot(full_report, tmp_path):
    run, _, _ = full_report
    out = tmp_path / "shot.png"
    res = subprocess.run(
        ["bash", str(SCRIPT), str(run), str(out)], capture_output=True, text=True, timeout=180, check=False
    )
    assert res.returncode == 0, res.stderr
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1400, 4000)
        px = np.asarray(im.convert("RGB")).astype(int)
    assert len(np.unique(px.reshape(-1, 3)[::7], axis=0)) > 200  # not blank: text, tables, plots
    header = px[:120].reshape(-1, 3)
    assert (np.abs(header - [16, 42, 67]).sum(1) < 12).mean() > 0.5  # the CSS was applied (dark header)
    orange = (np.abs(px.reshape(-1, 3) - [230, 159, 0]).sum(1) < 40).sum()
    assert orange > 500  # figures loaded (image-modality colour)


# ------------------------------------------------------------------------------------------- missing pieces


def test_rtn_only_without_summary_embedded_images(tiny_run_src, tmp_path):
    run = _small_run(tiny_run_src[0], tmp_path / "run", summary=False)
    index = build_report(run, embed_images=True)
    html = _html(index)
    assert sorted(p.name for p in index.parent.iterdir()) == ["index.html"]  # one self-contained file
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "No summary.json" in html  # table assembled from report.json rows
    assert "has no dispersion / outlier / clip arrays" in html
    assert "No embeddings.png" in html
    assert _warnings(html) == []
    assert EXTERNAL.search(html) is None


def test_single_modality_and_no_channel_arrays(tiny_run_src, tmp_path):
    run = _small_run(tiny_run_src[0], tmp_path / "run")
    rep_path = run / "rtn-w4a4" / "report.json"
    rep = json.loads(rep_path.read_text())
    for layer in rep["quantization"]["layers"]:
        layer["rel_error"] = {k: v for k, v in layer["rel_error"].items() if k in ("all", "text")}
        for info in layer["linears"].values():
            info["stats"] = {k: v for k, v in info["stats"].items() if k in ("all", "text")}
            info["modalities"] = ["text"]
    rep_path.write_text(json.dumps(rep))
    (run / "rtn-w4a4" / "channels.safetensors").unlink()
    html = _html(build_report(run))
    assert "Only one modality (text)" in html
    assert "Per-channel arrays (channels.safetensors) are missing" in html
    assert "no channels.safetensors" in html
    assert _warnings(html) == []


def test_corrupt_inputs_become_notes(tiny_run_src, tmp_path):
    run = _small_run(tiny_run_src[0], tmp_path / "run", recipes=("rtn-w4a4",))
    bad = run / "broken"
    bad.mkdir()
    (bad / "report.json").write_text("{not json")
    (run / "rtn-w4a4" / "channels.safetensors").write_bytes(b"\x00garbage")
    (run / "compare.json").write_text(
        json.dumps(
            [
                {"recipe": "rtn-w4a4", "method": "rtn", "wiki_ppl": 12.5},
                {"recipe": "morpho", "method": "morpho", "wiki_ppl": 11.25},
            ]
        )
    )
    (run / "partial").mkdir()
    (run / "partial" / "layers.jsonl").write_text("{}\n")
    html = _html(build_report(run))
    assert "recipe broken: report.json could not be read (JSONDecodeError" in html
    assert "channels.safetensors could not be read" in html
    assert "Comparison (morphoquant compare)" in html and "11.25" in html
    assert "incomplete recipe run(s) without report.json" in html and "partial" in html
    assert _warnings(html) == []


def test_recipe_directory_and_rebuild_replaces_previous(tiny_run_src, tmp_path):
    run = _small_run(tiny_run_src[0], tmp_path / "run")
    one = run / "rtn-w4a4"
    old = one / "report"
    old.mkdir()
    (old / "index.html").write_text("old")
    (old / "stale.png").write_bytes(b"x")
    index = build_report(one, embed_images=True)
    assert index == old / "index.html" and "rtn-w4a4" in _html(index)
    assert not (old / "stale.png").exists()
    assert not [p for p in one.iterdir() if p.name.startswith(".report-")]  # no temporary left behind


def test_load_run_orders_recipes_as_summary(tiny_run_src):
    data = load_run(tiny_run_src[0])
    assert [r.name for r in data.runs] == ["rtn-w4a4", "morpho"]
    morpho = data.runs[1]
    assert morpho.has_method_arrays and not data.runs[0].has_method_arrays
    assert {k[0] for k, _ in morpho.linears()} == {"vision", "audio", "text"}


# ------------------------------------------------------------------------------------------- bad input


def test_bad_run_directories(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        build_report(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ReportError, match="not a directory"):
        build_report(f)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.md").write_text("hello")
    with pytest.raises(ReportError, match="no report.json"):
        build_report(empty)
    assert not (empty / "report").exists()
    only_bad = tmp_path / "bad"
    (only_bad / "r").mkdir(parents=True)
    (only_bad / "r" / "report.json").write_text("[1, 2")
    with pytest.raises(ReportError, match="could be read"):
        build_report(only_bad)
    assert issubclass(ReportError, ValueError)


def test_output_directory_with_foreign_content_is_refused(tiny_run_src, tmp_path):
    run = _small_run(tiny_run_src[0], tmp_path / "run")
    (run / "report").mkdir()
    (run / "report" / "mine.txt").write_text("keep me")
    with pytest.raises(ReportError, match="not a previous report"):
        build_report(run)
    assert (run / "report" / "mine.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------- embedding plot


def test_embedding_plot_random(tmp_path):
    g = torch.Generator().manual_seed(0)
    fp = torch.randn(300, 32, generator=g)
    q = fp + 0.05 * torch.randn(300, 32, generator=g)
    ids = torch.tensor([0] * 150 + [1] * 60 + [3] * 80 + [-1] * 10, dtype=torch.int8)
    out = embedding_plot(fp, q, ids, tmp_path / "embeddings.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 400
    # numpy input, names as ids, a single modality
    out2 = embedding_plot(fp.numpy(), q.numpy(), ["audio"] * 300, tmp_path / "one.png")
    assert out2.is_file()


def test_embedding_plot_bad_input(tmp_path):
    fp = np.zeros((10, 4))
    with pytest.raises(ReportError, match=r"\[N, H\]"):
        embedding_plot(fp, np.zeros((10, 5)), np.zeros(10, int), tmp_path / "e.png")
    with pytest.raises(ReportError, match="modality_ids has 9 entries"):
        embedding_plot(fp, fp, np.zeros(9, int), tmp_path / "e.png")
    with pytest.raises(ReportError, match="no finite, non-padding"):
        embedding_plot(fp, fp, -np.ones(10, int), tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()


# ------------------------------------------------------------------------------------------- helpers, scale


def test_metric_direction_and_formatting():
    from morphoquant.report.html import direction, fmt

    assert direction("wiki_ppl") == "lower" and direction("vqa_acc") == "higher"
    assert direction("top1_agree") == "higher" and direction("outlier_percent") is None
    assert fmt(0.028477, "outlier_channel_share") == "2.85 %"
    assert fmt(None) == "—" and fmt(1234) == "1,234" and fmt([1.5, 2.25]) == "[1.5, 2.25]"
    assert fmt(float("nan")) == "nan" and fmt(1.0e-5) == "1.000e-05"


def test_large_model_plots(tmp_path):
    """Many linears (lines with bands instead of side-by-side bars) and wide layers (max-pooled heat map)."""
    from morphoquant.report import plots

    rng = np.random.default_rng(0)
    keys = [("text", b, n) for b in range(14) for n in ("q", "k", "v", "o", "gate", "up", "down")]
    bands = {
        m: {
            q: rng.uniform(lo, lo + 1, len(keys))
            for q, lo in (("p10", 0.1), ("p50", 1), ("p90", 3), ("max", 10))
        }
        for m in ("text", "image")
    }
    assert plots.plot_activation_range(keys, bands, tmp_path / "act.png").is_file()
    masks = [(rng.random(2500 if k[2] == "down" else 640) < 0.01).astype(np.uint8) for k in keys]
    names = [".".join(map(str, k)) for k in keys]
    assert plots.plot_outlier_heatmap(names, masks, tmp_path / "heat.png").is_file()
    pooled = plots._maxpool(np.array([[0, 1, 0, 0, np.nan, np.nan]], dtype=float), 1, 2)
    assert np.array_equal(pooled[:, :2], [[1, 0]]) and np.isnan(pooled[0, 2])

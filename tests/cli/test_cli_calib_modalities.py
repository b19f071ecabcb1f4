"""``--calib-modalities`` of ``quantize`` / ``compare``: parsed before the model loads, passed to the task, and one
clear line (exit 2) for an empty or unknown list or a task whose calibration mix is fixed. Tiny models."""
from __future__ import annotations

import json

import pytest

from morphoquant.cli import main as cli
from morphoquant.eval import tasks
from morphoquant.eval.omnimini import OmniMiniTask
from morphoquant.models.tiny import tiny_model


class _FixedMixTask:
    """A text task's interface (no ``restrict_calibration_modalities``)."""

    metric, kind, lower_is_better = "wiki_ppl", "text-lm", True

    def __init__(self, factory):
        self.factory = factory

    def calibration_samples(self, n, seq_len, seed=0):
        return [self.factory(seed=i) for i in range(n)]

    def describe(self):
        return {"task": self.kind}


class _OmniOnTiny(OmniMiniTask):
    """OmniMini's calibration-mix logic; samples of a tiny Llama, one per calibration kind used."""

    def __init__(self, factory, **kw):
        super().__init__(None, **kw)
        self.factory = factory
        self.used: list[tuple[str, ...]] = []

    def calibration_samples(self, n, seq_len=None, seed=0):
        self.used.append(self.calib_kinds)
        return [self.factory(seed=i) for i in range(n)]

    def evaluate(self, model, reference=None, progress=False):
        return {"omni_acc": 0.5, "vqa_acc": 0.75, "spoken_vqa_acc": 0.5, "asr_wer": 0.25, "wiki_ppl": 12.0}


@pytest.fixture
def tiny(monkeypatch):
    model, factory = tiny_model("llama")
    made = []

    def load(ref):
        if ref == "never":
            raise AssertionError("the model was loaded before the option was checked")
        return model, None

    def task_for(m, p, **kw):
        made.append(_OmniOnTiny(factory, eval_size=kw.get("eval_windows")) if load.omni else _FixedMixTask(factory))
        return made[-1]
    load.omni = True          # the task_for stand-in builds OmniMini's task (False: a fixed-mix text task)
    monkeypatch.setattr(cli, "_load", load)
    monkeypatch.setattr(tasks, "task_for", task_for)
    monkeypatch.setattr(cli, "_write_report", lambda run_dir: None)
    return load, made


@pytest.mark.parametrize("value", ["", ",", "image,smell"])
def test_empty_or_unknown_modalities_fail_before_loading(tiny, capsys, value):
    assert cli.main(["quantize", "never", "--no-eval", "--calib-modalities", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("morphoquant: error: --calib-modalities expects") and "image,audio,text" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_task_with_a_fixed_mix_is_refused(tiny, capsys):
    tiny[0].omni = False
    assert cli.main(["quantize", "x", "-r", "rtn-w4a4", "--no-eval", "--calib-modalities", "text"]) == 2
    err = capsys.readouterr().err
    assert "fixed calibration mix" in err and "drop the option" in err and err.count("\n") == 1


def test_modalities_without_a_document_are_one_line(tiny, capsys):
    assert cli.main(["quantize", "x", "-r", "rtn-w4a4", "--no-eval", "--calib-modalities", "image,audio"]) == 2
    err = capsys.readouterr().err
    assert "add text" in err and err.count("\n") == 1


def test_compare_calibrates_on_the_chosen_modalities(tiny, tmp_path):
    _, made = tiny
    out = tmp_path / "cmp"
    assert cli.main(["--quiet", "compare", "x", "-r", "rtn-w4a4", "--set", "weights.group_size=16", "--calib", "2",
                     "--eval-size", "16", "--calib-modalities", "image,text", "--out", str(out)]) == 0
    task = made[-1]
    assert task.used == [("image_qa", "text")] and task.sizes["asr"] == 6
    data = json.loads((out / "compare.json").read_text())
    assert data["meta"]["task"]["calib_modalities"] == ["image", "text"]
    fp, q = data["rows"]
    # the task's per-task columns, for the FP row as well
    assert fp["recipe"] == "fp32" and fp["vqa_acc"] == 0.75 and fp["asr_wer"] == 0.25 and q["wiki_ppl"] == 12.0
    assert "vqa_acc" in (out / "compare.md").read_text().splitlines()[2]


def test_without_the_option_the_full_mix_is_used(tiny):
    _, made = tiny
    assert cli.main(["--quiet", "quantize", "x", "-r", "rtn-w4a4", "--set", "weights.group_size=16", "--calib", "2",
                     "--no-eval", "--no-save"]) == 0
    assert made[-1].used == [("image_qa", "spoken_qa", "asr", "text")]

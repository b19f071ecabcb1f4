"""``compare``: a recipe that cannot run on the model becomes an error row (the others still run, exit 4), and a
recipe finished earlier in the same --out with the same settings is reused instead of re-run. Tiny models."""
from __future__ import annotations

import json

import pytest

from morphoquant.cli import main as cli
from morphoquant.eval import tasks
from morphoquant.models.tiny import tiny_model


class _Task:
    metric, kind, lower_is_better = "wiki_ppl", "text-lm", True

    def __init__(self, factory, eval_size):
        self.factory, self.eval_size = factory, eval_size
        self.evaluated = 0

    def calibration_samples(self, n, seq_len=None, seed=0):
        return [self.factory(seed=i) for i in range(n)]

    def evaluate(self, model, reference=None, progress=False):
        self.evaluated += 1
        return {"wiki_ppl": 10.0 + self.evaluated}

    def describe(self):
        return {"task": self.kind, "metric": self.metric, "eval_size": self.eval_size}


@pytest.fixture
def tiny(monkeypatch):
    model, factory = tiny_model("dinov2")       # an encoder QuaRot cannot rotate
    made = []

    def task_for(m, p, **kw):
        made.append(_Task(factory, kw.get("eval_windows")))
        return made[-1]
    monkeypatch.setattr(cli, "_load", lambda ref: (model, None))
    monkeypatch.setattr(tasks, "task_for", task_for)
    monkeypatch.setattr(cli, "_write_report", lambda run_dir: None)
    return made


ARGS = ["--quiet", "compare", "x", "--set", "weights.group_size=16", "--calib", "1", "--eval-size", "4"]


def test_a_failing_method_is_an_error_row_and_the_rest_runs(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = cli.main(ARGS + ["-r", "quarot-w4a4", "-r", "rtn-w4a4", "--out", str(out)])
    assert rc == 4
    err = capsys.readouterr().err
    assert "could not run" in err and "quarot-w4a4" in err and "Traceback" not in err
    rows = {r["recipe"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert rows["quarot-w4a4"]["error"].startswith("UnsupportedRotationError: QuaRot-style rotation")
    assert rows["quarot-w4a4"]["wiki_ppl"] is None
    assert rows["rtn-w4a4"]["wiki_ppl"] == 12.0 and "error" not in rows["rtn-w4a4"]
    assert "error" in (out / "compare.md").read_text().splitlines()[2]


def test_a_finished_recipe_is_reused_unless_settings_change(tiny, tmp_path):
    out = tmp_path / "cmp"
    assert cli.main(ARGS + ["-r", "rtn-w4a4", "--out", str(out)]) == 0
    first = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["wiki_ppl"] for r in first] == [11.0, 12.0]
    # same command + one more recipe: rtn-w4a4 is not quantized or evaluated again
    assert cli.main(ARGS + ["-r", "rtn-w4a4", "-r", "rtn-w8a8", "--out", str(out)]) == 0
    assert tiny[-1].evaluated == 2                      # FP + rtn-w8a8 only
    rows = {r["recipe"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert rows["rtn-w4a4"]["wiki_ppl"] == 12.0 and rows["rtn-w8a8"]["wiki_ppl"] == 12.0
    # another calibration size, another evaluation size or --overwrite: re-run
    assert cli.main(ARGS[:-4] + ["--calib", "2", "--eval-size", "4", "-r", "rtn-w4a4", "--out", str(out)]) == 0
    assert tiny[-1].evaluated == 2
    assert cli.main(ARGS[:-2] + ["--eval-size", "5", "-r", "rtn-w4a4", "--out", str(out)]) == 0
    assert tiny[-1].evaluated == 2
    assert cli.main(ARGS + ["-r", "rtn-w4a4", "--out", str(out), "--overwrite"]) == 0
    assert tiny[-1].evaluated == 2


def test_a_reworded_description_does_not_re_run_a_finished_recipe(tiny, tmp_path):
    out = tmp_path / "cmp"
    rec = tmp_path / "mine.yaml"
    rec.write_text("name: mine\nbase: rtn-w4a4\ndescription: first wording\n")
    assert cli.main(ARGS + ["-r", str(rec), "--out", str(out)]) == 0
    assert tiny[-1].evaluated == 2                      # FP + mine
    rec.write_text("name: mine\nbase: rtn-w4a4\ndescription: second wording\n")
    assert cli.main(ARGS + ["-r", str(rec), "--out", str(out)]) == 0
    assert tiny[-1].evaluated == 1                      # FP only: the row is reused
    rec.write_text("name: mine\nbase: rtn-w4a4\ndescription: second wording\nweights: {bits: 8}\n")
    assert cli.main(ARGS + ["-r", str(rec), "--out", str(out)]) == 0
    assert tiny[-1].evaluated == 2                      # a setting changed: re-run


def test_a_setting_added_to_the_schema_since_a_row_ran_does_not_re_run_it(tiny, tmp_path):
    """A row saved before a new recipe setting existed (its recipe.yaml lacks the key) is reused while the
    setting keeps its default; choosing another value re-runs it."""
    out = tmp_path / "cmp"
    assert cli.main(ARGS + ["-r", "rtn-w4a4", "--out", str(out)]) == 0
    saved = out / "rtn-w4a4" / "recipe.yaml"
    text = saved.read_text()
    assert "group_order: natural" in text
    saved.write_text(text.replace("  group_order: natural\n", ""))       # as written before the setting existed
    assert cli.main(ARGS + ["-r", "rtn-w4a4", "--out", str(out)]) == 0
    assert tiny[-1].evaluated == 1                      # FP only: the row is reused
    assert cli.main(ARGS + ["-r", "rtn-w4a4", "--set", "weights.group_order=act_scale", "--out", str(out)]) == 0
    assert tiny[-1].evaluated == 2                      # a setting changed: re-run

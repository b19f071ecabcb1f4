import json

import pytest

from morphoquant.cli import main as cli
from morphoquant.models.tiny import tiny_model


def test_recipes_lists_builtins(capsys):
    assert cli.main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "morpho-reference" in out and "rtn-w4a4" in out


def test_bad_recipe_is_one_clear_line(capsys):
    assert cli.main(["quantize", "-r", "no-such-recipe", "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("morphoquant: error:") and "no recipe" in err and "Traceback" not in err


def test_bad_set_override(capsys):
    assert cli.main(["quantize", "--set", "weights.bits=0", "--no-eval"]) == 2
    assert "bits must be" in capsys.readouterr().err


def test_unknown_model_is_clear(capsys):
    assert cli.main(["quantize", "not-a-model", "--no-eval"]) == 2
    assert "smollm2-135m" in capsys.readouterr().err      # the error lists the zoo names


def test_dry_run_prints_modules_bits_and_scope(monkeypatch, capsys):
    model, _ = tiny_model("qwen2.5-omni-thinker")
    monkeypatch.setattr(cli, "_load", lambda ref: (model, None))
    assert cli.main(["quantize", "x", "-r", "morpho", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stack text: QUANTIZE" in out and "stack audio: keep 16-bit" in out
    assert "self_attn.q_proj" in out and "A4 channel static" in out and "talker" not in out
    assert "lm_head" in out                                # listed among the never-quantized modules


def test_out_dir_holding_another_model_is_refused(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"model": "other", "recipe": "rtn-w4a4"}))
    with pytest.raises(cli.CLIError, match="already holds other"):
        cli._check_out_dir(d, "smollm2-135m", "rtn-w4a4", overwrite=False)
    cli._check_out_dir(d, "smollm2-135m", "rtn-w4a4", overwrite=True)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.bin").write_bytes(b"1")
    with pytest.raises(cli.CLIError, match="not written by morphoquant"):
        cli._check_out_dir(tmp_path / "foreign", "m", "r", overwrite=False)


def test_compare_tables_and_sanity_flag(tmp_path):
    from morphoquant.pipeline.recipe import load_recipe
    recipes = [load_recipe("rtn-w4a4")]
    recipes += cli._sanity_recipes(recipes, {})
    assert [r.name for r in recipes] == ["rtn-w4a4", "rtn@w8a8"]
    assert recipes[1].weights.bits == 8 and recipes[1].activations.bits == 8

    class T:
        metric, kind, lower_is_better = "wiki_ppl", "text-lm", True

        def describe(self):
            return {"task": self.kind}

    class A:
        model = "tiny"
    rows = [{"recipe": "fp32", "wiki_ppl": 10.0}, {"recipe": "rtn-w4a4", "wiki_ppl": 50.0, "x_fp": 5.0},
            {"recipe": "rtn@w8a8", "wiki_ppl": 12.0, "x_fp": 1.2}]
    cli._write_compare(rows, recipes, T(), A(), tmp_path)
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["rows"][2]["sanity"] == "FAIL" and "versions" in data["meta"]
    assert "| rtn-w4a4 | rtn | Wg64" not in (tmp_path / "compare.md").read_text()
    assert "W4g64" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.csv").read_text().startswith("recipe,method")

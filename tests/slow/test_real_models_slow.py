"""Real-model checks (run with ``pytest -m slow``; minutes on a CPU)."""
import copy

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    from morphoquant.eval.tasks import task_for
    from morphoquant.zoo import load_model
    model, tok = load_model("smollm2-135m")
    return model, task_for(model, tok, eval_windows=4, seq_len=512)


def test_w8a8_rtn_stays_near_fp_on_smollm2(smollm):
    from morphoquant import quantize
    model, task = smollm
    fp = task.evaluate(model)["wiki_ppl"]
    q = copy.deepcopy(model)
    quantize(q, "rtn-w8a8", task.calibration_samples(4, 512), progress=False)
    assert task.evaluate(q)["wiki_ppl"] < fp * 1.1


def test_morpho_w4a4_beats_rtn_w4a4_on_smollm2(smollm):
    from morphoquant import quantize
    model, task = smollm
    samples = task.calibration_samples(8, 512)
    ppl = {}
    for recipe in ("rtn-w4a4", "morpho"):
        q = copy.deepcopy(model)
        quantize(q, recipe, samples, progress=False)
        ppl[recipe] = task.evaluate(q)["wiki_ppl"]
    assert ppl["morpho"] < ppl["rtn-w4a4"] / 5


def test_main_job_command_runs(tmp_path):
    from morphoquant.cli.main import main
    assert main(["--quiet", "quantize", "-r", "rtn-w4a4", "--calib", "4", "--eval-size", "2",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "summary.json").exists() and (tmp_path / "rtn-w4a4" / "report.json").exists()

"""benchmarks/probe_block.py (held-out block error), benchmarks/drift.py (drift from FP) and
benchmarks/window_probe.py (saturated static ranges) on a tiny decoder."""
import copy
import importlib.util
import math
from pathlib import Path

import torch

from morphoquant.methods.quarot import rotate_model
from morphoquant.models import get_adapter
from morphoquant.models.tiny import tiny_model
from morphoquant.pipeline.recipe import load_recipe
from morphoquant.pipeline.runner import LayerwiseRunner


def _load(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


probe = _load("probe_block")
drift = _load("drift")
window_probe = _load("window_probe")
RTN = load_recipe("rtn-w4a4", {"weights": {"group_size": 16}})


def _unpadded(model, n, seed=0):
    """Full windows, no padding (the probe's real windows have none; the runner leaves padded tokens out)."""
    gen = torch.Generator().manual_seed(seed)
    v = model.config.vocab_size
    return [{"input_ids": torch.randint(3, v, (2, 12), generator=gen), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
            for _ in range(n)]


@torch.no_grad()
def _perturb_norms(model):
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)


def test_probe_error_on_the_calibration_windows_is_the_pipelines_block_error():
    """The probe's own measure, on the calibration inputs, reproduces the runner's per-block error. It did not while
    the captured inputs carried the forward's KV cache: every later call of the block attended to stale keys."""
    model, _ = tiny_model("llama")
    samples = _unpadded(model, 2)
    b = 1
    fp_block = model.model.layers[b]
    inputs = probe.block_inputs(model, fp_block, samples)
    assert all(kw.get("past_key_values") is None and kw.get("cache") is None for _, kw in inputs)
    m = copy.deepcopy(model)
    stacks = get_adapter(m).stacks()
    stacks[0].blocks = [m.model.layers[b]]
    with torch.no_grad():
        rec = LayerwiseRunner(m, stacks, RTN, samples, progress=False).run().records[0]
    mean, first = probe.token_error(fp_block, m.model.layers[b], inputs)
    assert math.isclose(mean, rec.rel_error["all"], rel_tol=1e-5)
    assert 0 < first and mean > 0
    assert probe.token_error(fp_block, fp_block, inputs) == (0.0, 0.0)


def test_drift_by_hand():
    h_fp = [[torch.tensor([[3.0, 4.0], [1.0, 0.0]])]]
    h_q = [[torch.tensor([[3.0, 9.0], [1.0, 0.0]])]]          # token errors 5/5 = 1 and 0
    l_fp = [torch.zeros(1, 2, 2)]
    l_q = [torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])]  # P_Q = (3/4, 1/4) for the first token
    r = drift.drift((h_fp, l_fp), (h_q, l_q))
    assert r["drift"] == [0.5]
    kl_first = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert math.isclose(r["kl"], kl_first / 2, rel_tol=1e-5)


def test_a_rotated_fp_model_does_not_drift_and_a_quantized_one_does():
    model, _ = tiny_model("llama")
    _perturb_norms(model)
    samples = _unpadded(model, 1, seed=3)
    fp = drift.block_outputs(model, samples)
    rotated = copy.deepcopy(model)
    rotate_model(rotated, get_adapter(rotated).stacks(), seed=1)
    r = drift.drift(fp, drift.block_outputs(rotated, samples))
    assert max(r["drift"]) < 1e-4 and abs(r["kl"]) < 1e-6
    q = copy.deepcopy(model)
    with torch.no_grad():
        LayerwiseRunner(q, get_adapter(q).stacks(), RTN, samples, progress=False).run()
    r = drift.drift(fp, drift.block_outputs(q, samples))
    assert len(r["drift"]) == len(model.model.layers) and min(r["drift"]) > 1e-3 and r["kl"] > 0


def test_window_nll_is_the_tables_perplexity_window_by_window():
    model, _ = tiny_model("llama")
    windows = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    nll = drift.window_nll(model, windows)
    with torch.no_grad():
        logits = model(input_ids=windows).logits.float()
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                windows[:, 1:].reshape(-1), reduction="none").reshape(3, -1)
    assert torch.allclose(torch.tensor(nll, dtype=torch.float64), by_hand.mean(1).double(), atol=1e-5)


def test_saturated_share_by_hand():
    """Static asymmetric int4 ranges [0, 15·s]: a row counts the elements whose code leaves [0, 15]; a DABC
    outlier channel never counts (its residual takes the 16-bit path)."""
    from torch import nn

    from morphoquant.layers import ActivationConfig, QuantLinear
    from morphoquant.numerics import QuantSpec
    lin = nn.Linear(4, 2)
    act = ActivationConfig(QuantSpec(4, False, "channel"), False)
    q = QuantLinear.from_linear(lin, QuantSpec(4, True, "group", 2), act, act_range=(torch.zeros(4), torch.full((4,), 15.0)),
                                outlier_idx=torch.tensor([3]), dabc="dense")
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [16.0, -1.0, 3.0, 99.0], [20.0, 2.0, 30.0, -5.0]])
    assert window_probe.saturated_share(q, x).tolist() == [0.0, 0.5, 0.5]
    assert window_probe.token_nll(tiny_model("llama")[0], torch.arange(6)).shape == (5,)

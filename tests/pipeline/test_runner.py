import copy
import json

import pytest
import torch

from morphoquant import quantize
from morphoquant.layers import QuantLinear
from morphoquant.methods import EmptyLayerError
from morphoquant.models.tiny import tiny_model
from morphoquant.pipeline.recipe import load_recipe
from morphoquant.pipeline.runner import CalibrationDataError
from morphoquant.statistics import NonFiniteActivationError


def _recipe(name, **over):
    base = {"weights": {"group_size": 16}}
    base.update(over)
    return load_recipe(name, base)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def llama():
    model, factory = tiny_model("llama")
    return model, factory


def test_w8a8_is_close_and_every_linear_is_quantized(llama, tmp_path):
    model, factory = llama
    samples = [factory(seed=s) for s in range(2)]
    q = copy.deepcopy(model)
    rep = quantize(q, _recipe("rtn-w8a8"), samples, log_path=tmp_path / "layers.jsonl", progress=False)
    n_lin = sum(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == n_lin
    assert not isinstance(q.lm_head, QuantLinear)
    x = factory(seed=5)
    with torch.no_grad():
        assert _rel(q(**x).logits, model(**x).logits) < 0.03
    lines = [json.loads(line) for line in (tmp_path / "layers.jsonl").read_text().splitlines()]
    assert len(lines) == len(model.model.layers) and "all" in lines[0]["rel_error"]
    assert rep.records[0].rel_error["all"] < 0.02      # W8A8: mean per-token relative error ~0.6 %


def test_padding_tokens_are_excluded_from_statistics(llama):
    model, factory = llama
    sample = factory(seed=0)
    n_real = int(sample["attention_mask"].sum())
    assert n_real < sample["attention_mask"].numel()
    rep = quantize(copy.deepcopy(model), _recipe("rtn-w4a4"), [sample], progress=False)
    assert rep.records[0].linears["self_attn.q_proj"]["tokens"] == n_real


def test_quantized_outputs_feed_the_next_block(llama):
    """Block 1 is calibrated on block 0's quantized output: its error is not the FP-input error."""
    model, factory = llama
    samples = [factory(seed=0)]
    rep = quantize(copy.deepcopy(model), _recipe("rtn-w4a4"), samples, progress=False)
    assert len(rep.records) == len(model.model.layers)
    assert all(r.rel_error["all"] > 0 for r in rep.records)


def test_offload_and_sequential_match_or_run(llama):
    model, factory = llama
    samples = [factory(seed=s) for s in range(2)]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    quantize(a, _recipe("rtn-w4a4-static"), samples, progress=False)
    quantize(b, _recipe("rtn-w4a4-static", offload=True), samples, progress=False)
    x = factory(seed=9)
    with torch.no_grad():
        assert torch.equal(a(**x).logits, b(**x).logits)
    c = copy.deepcopy(model)
    rep = quantize(c, _recipe("rtn-w4a4-static", sequential=True), samples, progress=False)
    assert len(rep.records) == len(model.model.layers)


def test_deterministic(llama):
    model, factory = llama
    samples = [factory(seed=1)]
    outs = []
    for _ in range(2):
        q = copy.deepcopy(model)
        quantize(q, _recipe("morpho"), samples, progress=False)
        with torch.no_grad():
            outs.append(q(**factory(seed=3)).logits)
    assert torch.equal(outs[0], outs[1])


def test_empty_calibration_set(llama):
    with pytest.raises(CalibrationDataError, match="empty"):
        quantize(copy.deepcopy(llama[0]), _recipe("rtn-w4a4"), [], progress=False)


def test_layer_without_tokens_errors_or_passes_through(llama):
    model, factory = llama
    s = factory(seed=0)
    s["attention_mask"] = torch.zeros_like(s["attention_mask"])     # every token is padding
    with pytest.raises(EmptyLayerError, match="no calibration tokens"):
        quantize(copy.deepcopy(model), _recipe("rtn-w4a4"), [s], progress=False)
    q = copy.deepcopy(model)
    rep = quantize(q, _recipe("rtn-w4a4", on_empty_layer="passthrough"), [s], progress=False)
    assert rep.passthrough and not any(isinstance(m, QuantLinear) for m in q.modules())


def test_missing_modality_is_an_error(llama):
    model, factory = llama
    with pytest.raises(CalibrationDataError, match="audio"):
        quantize(copy.deepcopy(model), _recipe("rtn-w4a4", calibration={"modalities": ["text", "audio"]}),
                 [factory()], progress=False)


def test_recipe_for_missing_tower_is_an_error(llama):
    model, factory = llama
    with pytest.raises(CalibrationDataError, match="audio"):
        quantize(copy.deepcopy(model), _recipe("rtn-w4a4", stacks={"audio": {"enabled": True}}), [factory()],
                 progress=False)


def test_nan_weights_give_clear_error(llama):
    model, factory = llama
    q = copy.deepcopy(model)
    with torch.no_grad():
        q.model.layers[0].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="NaN"):
        quantize(q, _recipe("rtn-w4a4"), [factory()], progress=False)


def test_omni_thinker_towers_off_by_default_and_opt_in():
    model, factory = tiny_model("qwen2.5-omni-thinker")
    samples = [factory(seed=0)]
    q = copy.deepcopy(model)
    rep = quantize(q, _recipe("rtn-w4a4", weights={"group_size": 16}), samples, progress=False)
    assert rep.stacks == ["text"]
    q = copy.deepcopy(model)
    rec = _recipe("rtn-w4a4", stacks={"audio": {"enabled": True, "activations": {"bits": 8}},
                                      "vision": {"enabled": True, "weights": {"bits": 8, "granularity": "channel"}}})
    rep = quantize(q, rec, samples, progress=False)
    assert rep.stacks == ["vision", "audio", "text"]
    text_rec = next(r for r in rep.records if r.stack == "text")
    assert {"text", "image", "audio"} <= set(text_rec.rel_error)
    vis = next(r for r in rep.records if r.stack == "vision")
    assert "W8-channel" in next(iter(vis.linears.values()))["module"]


def test_group_size_not_dividing_width_is_an_error(llama):
    from morphoquant.pipeline.recipe import RecipeError
    model, factory = llama
    width = model.config.hidden_size
    with pytest.raises(RecipeError, match="does not divide"):
        quantize(copy.deepcopy(model), load_recipe("rtn-w4a4", {"weights": {"group_size": width - 1}}), [factory()],
                 progress=False)
    rep = quantize(copy.deepcopy(model), load_recipe("rtn-w4a4", {"weights": {"group_size": width - 1,
                                                                              "allow_partial_groups": True}}),
                   [factory()], progress=False)
    assert rep.records


def test_global_prepass_collects_statistics_only(llama, monkeypatch):
    """The network-wide pre-pass needs per-channel statistics, not GPTQ Hessians or search rows: with global
    thresholds the Hessian is fed exactly as often as without them (once per block calibration)."""
    from morphoquant.statistics import collector as col
    model, make = llama
    samples = [make(seed=i) for i in range(2)]
    calls = []
    real = col.HessianObserver.__call__
    monkeypatch.setattr(col.HessianObserver, "__call__", lambda self, *a: (calls.append(a[0]), real(self, *a))[1])
    counts = {}
    for thresholds in ("local", "local+global"):
        calls.clear()
        recipe = load_recipe("morpho-plus", {"options": {"grid_points": 3, "thresholds": thresholds}})
        assert recipe.weight_method == "gptq"
        quantize(copy.deepcopy(model), recipe, samples, progress=False)
        counts[thresholds] = len(calls)
    assert counts["local"] > 0 and counts["local+global"] == counts["local"]

"""The ablation recipes of benchmarks/ parse and differ from the paper recipe in exactly the option they name."""
from pathlib import Path

import pytest

from morphoquant.pipeline.recipe import load_recipe

ABL = Path(__file__).resolve().parents[2] / "benchmarks" / "ablations"
EXPECTED = {"abl-no-dabc": {"dabc"}, "abl-no-mdqfo": {"clip_search"}, "abl-lp-only": {"lambda_cos"},
            "abl-sparse": {"dabc"}, "abl-budget-2": {"budget"}, "abl-budget-10": {"budget"}}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ablation_changes_one_thing(name):
    base = load_recipe("morpho")
    r = load_recipe(ABL / f"{name}.yaml")
    assert r.name == name and r.weights == base.weights and r.activations == base.activations
    from morphoquant.methods.morpho import MorphoOptions
    a, b = MorphoOptions(**base.options).model_dump(), MorphoOptions(**r.options).model_dump()
    assert {k for k in a if a[k] != b[k]} == EXPECTED[name]


PLUS = {"plus-sparse": {"dabc"}, "plus-budget-10": {"budget"}}


@pytest.mark.parametrize("name", sorted(PLUS))
def test_plus_variant_changes_one_thing(name):
    from morphoquant.methods.morpho import MorphoOptions
    base = load_recipe("morpho-plus")
    r = load_recipe(ABL / f"{name}.yaml")
    assert r.name == name and r.weights == base.weights and r.activations == base.activations
    assert r.weight_method == base.weight_method and r.calibration == base.calibration
    a, b = MorphoOptions(**base.options).model_dump(), MorphoOptions(**r.options).model_dump()
    assert {k for k in a if a[k] != b[k]} == PLUS[name]


def test_reference_int4_variant_changes_only_the_weight_format():
    base = load_recipe("morpho-reference")
    r = load_recipe(ABL / "ref-int4.yaml")
    assert r.options == base.options and r.activations == base.activations
    assert (base.weights.format, r.weights.format) == ("nf4", "int")
    assert r.weights.model_dump(exclude={"format"}) == base.weights.model_dump(exclude={"format"})


def test_reference_gptq_grid_variant_changes_only_the_clip_search():
    from morphoquant.methods.morpho import MorphoOptions
    base = load_recipe("morpho-reference-gptq")
    r = load_recipe(ABL / "ref-gptq-grid03.yaml")
    assert r.weights == base.weights and r.activations == base.activations and r.weight_method == "gptq"
    a, b = MorphoOptions(**base.options).model_dump(), MorphoOptions(**r.options).model_dump()
    assert {k for k in a if a[k] != b[k]} == {"grid_points", "grid_low", "grid_spacing", "accumulate"}
    assert (b["grid_low"], b["grid_points"], b["grid_spacing"], b["accumulate"]) == (0.3, 30, "linear", "sum")


def test_sorted_groups_table_recipe_changes_only_the_group_order():
    table = ABL.parent / "table"
    base = load_recipe(table / "morpho-reference-gptq-hadamard.yaml")
    r = load_recipe(table / "morpho-reference-gptq-hadamard-sorted.yaml")
    assert r.options == base.options and r.activations == base.activations and r.weight_method == "gptq"
    assert (base.weights.group_order, r.weights.group_order) == ("natural", "act_scale")
    assert r.weights.model_dump(exclude={"group_order"}) == base.weights.model_dump(exclude={"group_order"})
    assert load_recipe(f"{table / 'morpho-reference-gptq-hadamard-sorted.yaml'}@w8a8").weights.group_order == "natural"


def test_sorted_reference_gptq_recipe_changes_only_the_group_order():
    table = ABL.parent / "table"
    base, r = load_recipe("morpho-reference-gptq"), load_recipe(table / "morpho-reference-gptq-sorted.yaml")
    assert r.options == base.options and r.activations == base.activations and r.weight_method == base.weight_method
    assert r.weights.model_dump(exclude={"group_order"}) == base.weights.model_dump(exclude={"group_order"})
    assert r.weights.group_order == "act_scale"


def test_o_proj_hadamard_recipe_adds_only_the_o_proj_rotation():
    table = ABL.parent / "table"
    base = load_recipe(table / "morpho-reference-gptq-hadamard-sorted.yaml")
    r = load_recipe(table / "morpho-reference-gptq-hadamard-o-sorted.yaml")
    assert r.weights == base.weights and r.activations == base.activations and r.weight_method == "gptq"
    a, b = dict(base.options), dict(r.options)
    assert a.pop("online_hadamard") == ["down_proj", "fc2"] and a == {k: v for k, v in b.items() if k != "online_hadamard"}
    assert set(b["online_hadamard"]) == {"o_proj", "out_proj", "down_proj", "fc2"}

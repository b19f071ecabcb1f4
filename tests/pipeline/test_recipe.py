import pytest

from morphoquant.pipeline.recipe import RecipeError, builtin_recipes, load_recipe, parse_recipe


def test_builtins_load_and_round_trip(tmp_path):
    names = builtin_recipes()
    assert {"rtn-w4a4", "rtn-w8a8", "morpho", "morpho-reference", "morpho-modal"} <= set(names)
    for n in names:
        r = load_recipe(n)
        p = tmp_path / f"{n}.yaml"
        p.write_text(r.to_yaml())
        assert load_recipe(p) == r


@pytest.mark.parametrize("data,needle", [
    ({"method": "rtn", "weightz": {}}, "weightz: unknown key"),
    ({"weights": {"bits": 0}}, "bits must be"),
    ({"weights": {"granularity": "group", "group_size": 0}}, "group_size"),
    ({"activations": {"bits": 4, "granularity": "channel", "dynamic": True}}, "static"),
    ({"method": "nope"}, "unknown method"),
    ({"method": "morpho", "options": {"kk": 2}}, "kk"),
    ({"method": "morpho", "options": {"grid_low": 0.9, "grid_high": 0.5}}, "grid_low"),
    ({"calibration": {"num_samples": 0}}, "num_samples"),
])
def test_bad_recipes_have_clear_errors(data, needle):
    with pytest.raises(RecipeError, match=needle):
        parse_recipe(data)


def test_unknown_recipe_name_lists_builtins():
    with pytest.raises(RecipeError, match="rtn-w4a4"):
        load_recipe("does-not-exist")


def test_overrides_merge():
    r = load_recipe("morpho", {"options": {"k": 3.0}, "weights": {"group_size": 32}})
    assert r.options["k"] == 3.0 and r.options["dabc"] == "dense" and r.weights.group_size == 32


def test_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("method: [unclosed")
    with pytest.raises(RecipeError, match="YAML"):
        load_recipe(p)


def test_non_string_keys_are_a_recipe_error():
    with pytest.raises(RecipeError, match="keys must be names"):
        parse_recipe({1: "x"})

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


BASELINES = {"smoothquant-w4a4": "smoothquant", "awq-w4a16": "awq", "gptq-w4a16": "gptq", "gptq-w4a4": "gptq",
             "quarot-w4a4": "quarot", "quarot-gptq-w4a4": "quarot", "mbq-w4a4": "mbq", "mquant-w4a4": "mquant",
             "osplus-w4a4": "osplus"}


def test_baseline_recipes_ship_with_the_format_their_name_says():
    for name, method in BASELINES.items():
        r = load_recipe(name)
        assert r.method == method and r.name == name
        w, a = name.rsplit("-", 1)[1].removeprefix("w").split("a")
        assert r.weights.bits == int(w) and r.activations.bits == int(a)
    assert load_recipe("quarot-gptq-w4a4").weight_method == "gptq"


def test_format_suffix_moves_bit_widths_and_keeps_the_method():
    r = load_recipe("gptq-w4a4@w8a8")
    assert (r.name, r.method) == ("gptq-w4a4@w8a8", "gptq")
    assert (r.weights.bits, r.weights.granularity, r.weights.group_size) == (8, "channel", None)
    assert (r.activations.bits, r.activations.granularity) == (8, "token")
    # NF4 weights become int8 at W8; the static per-channel activation quantizer is kept
    r = load_recipe("morpho-reference@w8a8")
    assert r.weights.format == "int" and r.weights.bits == 8
    assert (r.activations.bits, r.activations.granularity, r.activations.symmetric) == (8, "channel", False)
    # a weight-only recipe gets dynamic per-token activations; W4A16 switches activations off
    r = load_recipe("awq-w4a16@w4a4")
    assert (r.activations.bits, r.activations.granularity, r.activations.symmetric) == (4, "token", True)
    assert load_recipe("rtn-w4a4@w4a16").activations.bits == 16
    # an 8-bit recipe moved to W4 gets int4 groups of 64
    r = load_recipe("rtn-w8a8@w4a8")
    assert (r.weights.bits, r.weights.granularity, r.weights.group_size) == (4, "group", 64)
    # overrides apply after the format
    assert load_recipe("rtn-w4a4@w8a8", {"activations": {"bits": 6}}).activations.bits == 6


def test_unknown_format_suffix_is_a_clear_error():
    with pytest.raises(RecipeError, match="unknown format 'w9'.*w8a8, w4a8, w4a16, w4a4"):
        load_recipe("rtn-w4a4@w9")
    with pytest.raises(RecipeError, match="no recipe 'nope'"):
        load_recipe("nope@w8a8")


# ---------------------------------------------------------------- base: inheritance
def _write(path, text):
    path.write_text(text)
    return path


def test_base_merges_mappings_and_replaces_values(tmp_path):
    f = _write(tmp_path / "v.yaml", "name: v\ndescription: d\nbase: morpho\noptions: {budget: 0.1}\n"
                                    "weights: {group_size: 128}\n")
    base, r = load_recipe("morpho"), load_recipe(f)
    assert (r.name, r.description) == ("v", "d")
    assert r.options == {**base.options, "budget": 0.1}
    assert r.weights.group_size == 128 and r.weights.bits == base.weights.bits
    assert r.activations == base.activations and r.method == base.method


def test_base_chain_relative_path_and_own_name(tmp_path):
    _write(tmp_path / "a.yaml", "name: a\ndescription: first\nbase: rtn-w4a4\nweights: {group_size: 32}\n")
    f = _write(tmp_path / "b.yaml", "base: a.yaml\nactivations: {bits: 8}\n")
    r = load_recipe(f)
    assert r.weights.group_size == 32 and r.activations.bits == 8 and r.method == "rtn"
    assert (r.name, r.description) == ("custom", "")      # a name is never inherited


def test_base_cycle_and_bad_base_are_clear_errors(tmp_path):
    _write(tmp_path / "a.yaml", "name: a\nbase: b.yaml\n")
    _write(tmp_path / "b.yaml", "name: b\nbase: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(RecipeError, match="no recipe 'nope'"):
        load_recipe(_write(tmp_path / "c.yaml", "name: c\nbase: nope\n"))
    with pytest.raises(RecipeError, match="base must be"):
        load_recipe(_write(tmp_path / "d.yaml", "name: d\nbase: [morpho]\n"))


def test_shipped_variants_resolve_to_their_base_plus_named_fields():
    base, r = load_recipe("morpho-reference"), load_recipe("morpho-reference-gptq")
    assert r.weight_method == "gptq" and base.weight_method == "rtn"
    assert r.model_dump(exclude={"name", "description", "weight_method"}) == \
        base.model_dump(exclude={"name", "description", "weight_method"})

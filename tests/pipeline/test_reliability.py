"""Bad input and determinism of the whole quantize → save path."""
import copy
import hashlib

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from morphoquant import quantize
from morphoquant.export import save_quantized
from morphoquant.models.tiny import tiny_model
from morphoquant.pipeline.recipe import RecipeError, load_recipe, parse_recipe
from morphoquant.pipeline.runner import CalibrationDataError

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True),
                    st.text(max_size=8))
TREES = st.recursive(SCALARS, lambda c: st.one_of(st.lists(c, max_size=3),
                                                  st.dictionaries(st.sampled_from(
                                                      ["method", "weights", "bits", "options", "k", "activations",
                                                       "granularity", "group_size", "stacks", "audio", "x"]), c,
                                                      max_size=4)), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=TREES)
def test_recipe_parser_fuzz_only_raises_recipe_error(data):
    try:
        parse_recipe(data)
    except RecipeError:
        pass


@settings(max_examples=50, deadline=None)
@given(text=st.text(max_size=200))
def test_recipe_yaml_fuzz(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("r") / "r.yaml"
    p.write_text(text)
    try:
        load_recipe(p)
    except RecipeError:
        pass
    except yaml.YAMLError:      # pragma: no cover - must be wrapped
        pytest.fail("YAML errors must surface as RecipeError")


def test_sequence_longer_than_model_limit_is_an_error():
    model, factory = tiny_model("llama")
    s = factory()
    limit = model.config.max_position_embeddings
    s = {"input_ids": torch.zeros(1, limit + 1, dtype=torch.long), "attention_mask": torch.ones(1, limit + 1)}
    with pytest.raises(CalibrationDataError, match="limit"):
        quantize(copy.deepcopy(model), "rtn-w4a4", [s], progress=False)


def _digest(d):
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_inputs_give_byte_identical_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    model, factory = tiny_model("llama")
    samples = [factory(seed=0), factory(seed=1)]
    recipe = load_recipe("morpho", {"weights": {"group_size": 16}})
    digests = []
    for i in range(2):
        q = copy.deepcopy(model)
        quantize(q, recipe, samples, progress=False)
        save_quantized(q, tmp_path / f"ck{i}", recipe, {"samples": 2}, verbose=False)
        digests.append(_digest(tmp_path / f"ck{i}"))
    assert digests[0] == digests[1]


def test_read_only_output_directory_fails_cleanly(tmp_path):
    import os
    model, factory = tiny_model("llama")
    q = copy.deepcopy(model)
    quantize(q, load_recipe("rtn-w4a4", {"weights": {"group_size": 16}}), [factory()], progress=False)
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):          # running as root: permissions are not enforced
            pytest.skip("permissions are not enforced for this user")
        with pytest.raises(OSError):
            save_quantized(q, ro / "ck", None, {}, verbose=False)
        assert not (ro / "ck").exists()
    finally:
        os.chmod(ro, 0o700)

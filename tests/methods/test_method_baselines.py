"""Every baseline through the layer-wise pipeline on every tiny adapter (all stacks enabled): the W8A8 sanity row.

A method that moves a tiny model's output by more than a few % at W8A8 has a bug (issue 4).
"""
import pytest

from morphoquant.methods import get_method
from morphoquant.methods.quarot import UnsupportedRotationError
from morphoquant.pipeline.recipe import parse_recipe

W8, A8 = {"bits": 8, "granularity": "channel"}, {"bits": 8, "granularity": "token"}
A8_STATIC = {"bits": 8, "granularity": "tensor"}

METHODS = {
    "gptq": {},
    "smoothquant": {"explicit": True},
    "awq": {"grid": 4, "clip_grid": 4},
    "mbq": {"grid": 4},
    "osplus": {"grid": 4},
    "quarot": {},
    "mquant": {"clip_grid": 4},
}
ARCHS = ["qwen2.5-omni-thinker", "qwen2.5-vl", "whisper", "dinov2"]
STACKS = {"qwen2.5-omni-thinker": ["vision", "audio", "text"], "qwen2.5-vl": ["vision", "text"],
          "whisper": ["encoder", "decoder"], "dinov2": ["vision"]}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registered_with_a_strict_option_schema(name):
    cls = get_method(name)
    assert cls.name == name and cls.__doc__ or cls.__module__
    parse_recipe({"method": name, "options": METHODS[name]})
    with pytest.raises(ValueError, match="unknown key|Extra inputs"):
        parse_recipe({"method": name, "options": {"no_such_option": 1}})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_w8a8_close_to_fp_on_every_adapter(name, arch, run_recipe, perturb_norms, modality_hook):
    recipe = {"method": name, "options": METHODS[name], "weights": W8,
              "activations": A8_STATIC if name == "mquant" else A8,
              "stacks": {s: {"enabled": True} for s in STACKS[arch]}}
    if name == "quarot" and arch == "dinov2":
        with pytest.raises(UnsupportedRotationError):
            run_recipe(arch, recipe, prepare=perturb_norms)
        return
    err, report, _ = run_recipe(arch, recipe, prepare=perturb_norms)
    assert set(report.stacks) == set(STACKS[arch])
    assert err < 0.05

"""MorphoQuant's online Hadamard (option ``online_hadamard``): the same function, statistics of ``x·H``."""
import pytest
import torch

from morphoquant.methods.morpho import MorphoQuant
from morphoquant.methods.quarot import HadamardLinear, HadamardQuantLinear
from morphoquant.models import get_adapter
from morphoquant.models.tiny import tiny_model
from morphoquant.numerics.hadamard import hadamard_transform


def test_transform_wraps_the_named_linears_and_keeps_the_function(perturb_norms, forward_output):
    model, factory = tiny_model("llama")
    perturb_norms(model)
    adapter = get_adapter(model)
    sample = factory(seed=3)
    ref = forward_output(model, sample, adapter)
    info = MorphoQuant({"online_hadamard": ["down_proj", "fc2"]}).transform(model, adapter.stacks())
    layers = model.model.layers
    assert info["online_hadamard"]["linears"] == len(layers)
    for layer in layers:
        assert isinstance(layer.mlp.down_proj, HadamardLinear)
        assert type(layer.mlp.up_proj) is torch.nn.Linear and type(layer.self_attn.o_proj) is torch.nn.Linear
    assert torch.allclose(forward_output(model, sample, adapter), ref, atol=1e-4, rtol=1e-4)


def test_whisper_fc2_of_encoder_and_decoder_is_wrapped_and_quantized(perturb_norms, forward_output, run_recipe):
    model, factory = tiny_model("whisper")
    perturb_norms(model)
    adapter = get_adapter(model)
    sample = factory(seed=3)
    ref = forward_output(model, sample, adapter)
    MorphoQuant({"online_hadamard": ["fc2"]}).transform(model, adapter.stacks())
    blocks = list(model.model.encoder.layers) + list(model.model.decoder.layers)
    assert all(isinstance(b.fc2, HadamardLinear) for b in blocks)
    assert torch.allclose(forward_output(model, sample, adapter), ref, atol=1e-4, rtol=1e-4)
    recipe = {"method": "morpho", "weights": {"bits": 4, "granularity": "group", "group_size": 16},
              "activations": {"bits": 8, "symmetric": False, "granularity": "channel"},
              "options": {"online_hadamard": ["fc2"], "clip_search": False}}
    err, _, quantized = run_recipe("whisper", recipe)
    assert all(isinstance(b.fc2, HadamardQuantLinear)
               for b in list(quantized.model.encoder.layers) + list(quantized.model.decoder.layers))
    assert err < 0.2


def test_no_matching_linear_is_a_clear_error():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="no nn.Linear of the quantized stacks ends with"):
        MorphoQuant({"online_hadamard": ["fc2"]}).transform(model, get_adapter(model).stacks())


def test_statistics_and_ranges_are_those_of_the_rotated_input(run_recipe):
    """Block 0 sees full-precision inputs: its down_proj's recorded per-channel |x| maxima must be those of
    ``x·H`` computed by hand from the FP model's down_proj input (paper recipe defaults, global thresholds
    included)."""
    from morphoquant.models.tiny import tiny_model as make

    fp, factory = make("llama")
    captured = []
    fp.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: captured.append(a[0].detach()))
    sample = factory(seed=0)
    with torch.no_grad():
        fp(**sample)
    x = captured[0][sample["attention_mask"].bool()]          # the pipeline's statistics skip padding
    expected = hadamard_transform(x).abs().amax(0)

    recipe = {"method": "morpho", "weights": {"bits": 4, "granularity": "group", "group_size": 16},
              "activations": {"bits": 4, "symmetric": False, "granularity": "channel"},
              "options": {"online_hadamard": ["down_proj"], "clip_search": False}}
    err, report, model = run_recipe("llama", recipe)
    assert isinstance(model.model.layers[0].mlp.down_proj, HadamardQuantLinear)
    absmax = report.channels["text.0.mlp.down_proj"]["absmax.all"]
    assert torch.allclose(absmax, expected, rtol=1e-4, atol=1e-5)
    assert 0 < err < 0.5

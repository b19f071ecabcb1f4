"""The integer runtime is bit-identical to the fake-quant path for every scheme, kernel and shape."""
from __future__ import annotations

import functools
import itertools
import zlib

import pytest
import torch
from torch import nn

from morphoquant.layers import ActivationConfig, QuantLinear
from morphoquant.numerics import QuantSpec
from morphoquant.numerics.integer_gemm import float_matmul
from morphoquant.runtime import (
    IntegerLinear,
    available_kernels,
    get_kernel,
    int_mm,
    integer_runtime_support,
    to_integer_runtime,
)

KERNELS = available_kernels() + ["auto", "auto-fast"]


def _fake(q, x):
    """The fake-quant reference: QuantLinear's per-group integer product evaluated in fp32 (integer_linear)."""
    return q(x, matmul=float_matmul)


def _exact_reference(model):
    """Make every QuantLinear of ``model`` use the integer-product fake path (in case the default is a faster
    single-GEMM approximation of it)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):      # type(m): a HadamardQuantLinear keeps its input rotation
            m.forward = functools.partial(type(m).forward, m, matmul=float_matmul)
    return model


def _layer(c, o, wspec, act, dabc, clip, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(c, o, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(o, c, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(o, generator=g))
    x = torch.randn(64, c, generator=g)
    x[:, 1] *= 25
    rng = None
    if act is not None and not act.dynamic:
        rng = ((x.amin(0) * 0.7, x.amax(0) * 0.7) if act.spec.granularity == "channel"
               else ((x.min() * 0.7).reshape(1), (x.max() * 0.7).reshape(1)))
    k = min(4, c)
    idx = torch.randperm(c, generator=g)[:k] if dabc != "none" else None
    thr = torch.rand(k, generator=g) if dabc == "sparse" else None
    clip_t = x.abs().amax(0) * 0.6 if clip else None
    return QuantLinear.from_linear(lin, wspec, act, act_range=rng, outlier_idx=idx, dabc=dabc,
                                   outlier_threshold=thr, act_clip=clip_t)


ACTS = {
    "a4-token-sym": ActivationConfig(QuantSpec(4, True, "token")),
    "a4-token-asym": ActivationConfig(QuantSpec(4, False, "token")),
    "a8-token-sym": ActivationConfig(QuantSpec(8, True, "token")),
    "a8-token-asym": ActivationConfig(QuantSpec(8, False, "token")),
    "a4-tensor-static-asym": ActivationConfig(QuantSpec(4, False, "tensor"), False),
    "a8-tensor-static-sym": ActivationConfig(QuantSpec(8, True, "tensor"), False),
    "a4-channel-folded-asym": ActivationConfig(QuantSpec(4, False, "channel"), False),
    "a4-channel-folded-sym": ActivationConfig(QuantSpec(4, True, "channel"), False),
}
WEIGHTS = {"w4-channel": QuantSpec(4, True, "channel"), "w8-channel": QuantSpec(8, True, "channel"),
           "w4-g16": QuantSpec(4, True, "group", 16), "w4-g7-partial": QuantSpec(4, True, "group", 7),
           "w4-tensor": QuantSpec(4, True, "tensor")}


@pytest.mark.parametrize("wname,aname,dabc", [
    (w, a, d) for w, a, d in itertools.product(WEIGHTS, ACTS, ["none", "dense", "sparse"])])
def test_bit_exact_with_fake_quant_path(wname, aname, dabc):
    act = ACTS[aname]
    seed = zlib.crc32(f"{wname}/{aname}/{dabc}".encode()) % 1000
    g = torch.Generator().manual_seed(seed)
    c = int(torch.randint(9, 70, (1,), generator=g))          # random widths, often not a multiple of the group
    o = int(torch.randint(1, 40, (1,), generator=g))
    q = _layer(c, o, WEIGHTS[wname], act, dabc, clip=act.dynamic and dabc != "none", seed=seed)
    for n in (1, 5, 37):
        x = torch.randn(n, c, generator=g) * 2
        x[:, 1] *= 25
        ref = _fake(q, x)
        for k in KERNELS:
            try:
                il = IntegerLinear(q, k)
            except ValueError as e:               # a kernel may refuse a combination it cannot do exactly
                assert "exactly" in str(e) or "saturate" in str(e)
                continue
            assert torch.equal(il(x), ref), (k, n)
        assert torch.equal(IntegerLinear(q, "int_mm", keep_reference=True).reference_forward(x), ref)


def test_three_dim_input_and_dtype():
    q = _layer(48, 24, QuantSpec(4, True, "group", 16), ACTS["a4-token-sym"], "dense", True, 0)
    x = torch.randn(2, 7, 48)
    il = IntegerLinear(q)
    assert torch.equal(il(x), _fake(q, x))
    assert il(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_eight_bit_extremes_stay_exact():
    """8-bit × 8-bit codes at the range ends: would saturate a pairwise int16 kernel if it were not split."""
    c, o = 256, 16
    lin = nn.Linear(c, o, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.weight[1].fill_(-1.0)
    q = QuantLinear.from_linear(lin, QuantSpec(8, True, "channel"), ActivationConfig(QuantSpec(8, False, "token")))
    x = torch.full((20, c), 3.0)
    x[:, 0] = -1.0                                     # codes 0 and 255
    ref = _fake(q, x)
    for k in KERNELS:
        try:
            il = IntegerLinear(q, k)
        except ValueError:
            continue
        assert torch.equal(il(x), ref), k


def test_int_mm_shapes_on_cpu():
    """torch._int_mm's CUDA constraints (M > 16, K and N multiples of 8) do not apply to the CPU build."""
    for m, k, n in [(1, 5, 3), (16, 8, 8), (3, 13, 7)]:
        a = torch.randint(-8, 8, (m, k), dtype=torch.int8)
        b = torch.randint(-8, 8, (k, n), dtype=torch.int8)
        assert torch.equal(int_mm(a, b), a.int() @ b.int())


def test_kernels_and_support():
    assert "int_mm" in available_kernels()
    with pytest.raises(ValueError, match="unknown"):
        get_kernel("nope")
    w16 = QuantLinear.from_linear(nn.Linear(8, 4), QuantSpec(4, True, "channel"), None)
    assert "weight-only" in integer_runtime_support(w16)
    nf4 = QuantLinear.from_linear(nn.Linear(8, 4), QuantSpec(4, True, "channel", fmt="nf4"), ACTS["a8-token-sym"])
    assert "code-book" in integer_runtime_support(nf4)
    asym = QuantLinear.from_linear(nn.Linear(8, 4), QuantSpec(4, False, "channel"), ACTS["a8-token-sym"])
    assert "asymmetric" in integer_runtime_support(asym)
    with pytest.raises(ValueError, match="weight-only"):
        IntegerLinear(w16)


W4G32 = QuantSpec(4, True, "group", 32)


def _hand_quantize(model, act, dabc="none", wspec=W4G32):
    g = torch.Generator().manual_seed(0)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and "model.layers" in name:
            c = mod.in_features
            rng = (-torch.rand(c, generator=g) - .5, torch.rand(c, generator=g) + .5) if not act.dynamic else None
            idx = torch.randperm(c, generator=g)[:2] if dabc != "none" else None
            model.set_submodule(name, QuantLinear.from_linear(mod, wspec, act, act_range=rng, outlier_idx=idx,
                                                              dabc=dabc))
    return model


@pytest.mark.parametrize("aname,dabc", [("a4-token-sym", "none"), ("a4-channel-folded-asym", "dense")])
def test_model_conversion_and_generate(aname, dabc):
    from morphoquant.models.tiny import tiny_model

    model, factory = tiny_model("llama")
    _hand_quantize(model, ACTS[aname], dabc)
    model.lm_head = QuantLinear.from_linear(model.lm_head, QuantSpec(4, True, "channel"), None)   # stays A16
    _exact_reference(model)
    sample = factory(seed=1)
    ids = factory(batch_size=1, pad=False)["input_ids"]
    with torch.no_grad():
        ref = model(**sample).logits
        gen_ref = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        rep = to_integer_runtime(model)
        assert len(rep["converted"]) == 14 and list(rep["skipped"]) == ["lm_head"]
        assert torch.equal(model(**sample).logits, ref)
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0), gen_ref)


def test_loaded_checkpoint_runs_on_integer_runtime(tmp_path):
    from morphoquant.export import load_quantized, save_quantized
    from morphoquant.models.tiny import tiny_model

    model, factory = tiny_model("qwen2")
    _hand_quantize(model, ACTS["a4-token-sym"], "dense")
    save_quantized(model, tmp_path / "m", verbose=False)
    _exact_reference(model)
    loaded = load_quantized(tmp_path / "m", runtime="integer")
    assert any(isinstance(m, IntegerLinear) for m in loaded.modules())
    sample = factory(seed=2)
    with torch.no_grad():
        assert torch.equal(model(**sample).logits, loaded(**sample).logits)


@pytest.mark.parametrize("name,over", [
    ("quarot-w4a4", {}),
    # MorphoQuant's online Hadamard: static per-channel ranges, DABC outliers and GPTQ on x·H
    ("morpho", {"options": {"online_hadamard": ["down_proj"], "clip_search": False}, "weight_method": "gptq"})])
def test_rotated_model_keeps_its_online_hadamard_through_a_checkpoint_and_the_integer_runtime(tmp_path, name, over):
    """QuaRot's down_proj quantizes x·H: the checkpoint stores the Hadamard block and reloads a
    HadamardQuantLinear, and the integer runtime rotates before quantizing (before the fix both dropped H)."""
    from morphoquant import quantize
    from morphoquant.export import load_quantized, read_manifest, save_quantized
    from morphoquant.methods.quarot import HadamardQuantLinear
    from morphoquant.models.tiny import tiny_model
    from morphoquant.pipeline.recipe import load_recipe

    model, factory = tiny_model("llama")
    recipe = load_recipe(name, {"weights": {"group_size": 16}, **over})
    quantize(model, recipe, [factory(seed=0)], progress=False)
    assert isinstance(model.model.layers[0].mlp.down_proj, HadamardQuantLinear)
    save_quantized(model, tmp_path / "m", recipe, verbose=False)
    rec = read_manifest(tmp_path / "m")["modules"]["model.layers.0.mlp.down_proj"]
    assert rec["online_hadamard"] is True and not rec["standard"]
    sample = factory(seed=2)
    loaded = load_quantized(tmp_path / "m")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, HadamardQuantLinear)
    with torch.no_grad():
        assert torch.equal(model(**sample).logits, loaded(**sample).logits)
    integer = load_quantized(tmp_path / "m", runtime="integer")
    assert isinstance(integer.model.layers[0].mlp.down_proj, IntegerLinear)
    assert integer.model.layers[0].mlp.down_proj.hadamard is not None
    _exact_reference(model)
    with torch.no_grad():
        assert torch.equal(model(**sample).logits, integer(**sample).logits)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 1, 3), (37, 1, 19), (17, 2, 8), (64, 3, 24)])
def test_int_mm_is_exact_for_tiny_reductions(m, k, n):
    """A reduction of one channel (a last weight group of size 1) is exact too: torch's CPU ``_int_mm``
    alone returns garbage for K = 1 on some processors, ``int_mm`` pads it."""
    g = torch.Generator().manual_seed(m * 100 + k)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    assert torch.equal(int_mm(a, w.T), (a.long() @ w.T.long()).int())

"""Schemes and the hand-quantization helper shared by the checkpoint tests (imported by conftest and tests)."""
from __future__ import annotations

import torch
from torch import nn

from morphoquant.layers import ActivationConfig, QuantLinear
from morphoquant.numerics import QuantSpec

W4G = QuantSpec(4, True, "group", 32)
A4T = ActivationConfig(QuantSpec(4, True, "token"), True)

#: scheme name -> (weight spec, activation config, dabc, clip?) ; "static" ranges come from random data
SCHEMES = {
    "w4a16": (W4G, None, "none", False),
    "w4a4": (W4G, A4T, "none", False),
    "w8a8": (QuantSpec(8, True, "channel"), ActivationConfig(QuantSpec(8, True, "token"), True), "none", False),
    "w4a8-asym-token": (W4G, ActivationConfig(QuantSpec(8, False, "token"), True), "none", False),
    "w4a4-static-tensor": (W4G, ActivationConfig(QuantSpec(4, False, "tensor"), False), "none", False),
    "w4a16-asym": (QuantSpec(4, False, "group", 32), None, "none", False),
    "w8a16-asym-channel": (QuantSpec(8, False, "channel"), None, "none", False),
    "morpho-dense": (W4G, ActivationConfig(QuantSpec(4, False, "channel"), False), "dense", False),
    "morpho-sparse": (W4G, ActivationConfig(QuantSpec(4, False, "channel"), False), "sparse", False),
    "morpho-sorted-groups": (QuantSpec(4, True, "group", 32, group_order="act_scale"),
                             ActivationConfig(QuantSpec(4, False, "channel"), False), "dense", False),
    "morpho-dynamic-clip": (W4G, A4T, "dense", True),
    "partial-groups": (QuantSpec(4, True, "group", 24), A4T, "none", False),
    "nf4-a8": (QuantSpec(4, True, "group", 32, fmt="nf4"), ActivationConfig(QuantSpec(8, True, "token")), "none",
               False),
    "w4-tensor-a4": (QuantSpec(4, True, "tensor"), A4T, "none", False),
    "w4a4-full-range": (QuantSpec(4, True, "group", 32, full_range=True), A4T, "none", False),
}
STANDARD = {"w4a16", "w4a4", "w8a8", "w4a8-asym-token", "w4a4-static-tensor", "w4a16-asym", "w8a16-asym-channel",
            "w4-tensor-a4", "w4a4-full-range"}


def hand_quantize(model: nn.Module, scheme: str, seed: int = 0, only: str = "model.layers") -> nn.Module:
    """Replace every ``nn.Linear`` whose name contains ``only`` by a QuantLinear of ``scheme`` (in place)."""
    wspec, act, dabc, clip = SCHEMES[scheme]
    g = torch.Generator().manual_seed(seed)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or only not in name:
            continue
        c = mod.in_features
        hi = torch.rand(c, generator=g) * 3 + 0.5
        lo = -torch.rand(c, generator=g) * 2 - 0.2
        rng = None
        if act is not None and not act.dynamic:
            rng = (lo, hi) if act.spec.granularity == "channel" else (lo.min().reshape(1), hi.max().reshape(1))
        idx = torch.randperm(c, generator=g)[:3].sort().values if dabc != "none" else None
        thr = torch.rand(3, generator=g) if dabc == "sparse" else None
        q = QuantLinear.from_linear(mod, wspec, act, act_range=rng, outlier_idx=idx, dabc=dabc,
                                    outlier_threshold=thr, act_clip=hi * 0.8 if clip else None)
        model.set_submodule(name, q)
    return model

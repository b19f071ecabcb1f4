"""On-disk layout of one ``QuantLinear``: the compressed-tensors tensors plus a ``morphoquant`` extension.

For a module ``m`` the checkpoint holds (``[O, K]`` = out × in features, ``b`` = weight bits, ``G`` = groups):

=====================================  =======  ================================================================
tensor                                 dtype    meaning
=====================================  =======  ================================================================
``m.weight_packed``                    int32    ``pack_to_int32`` of the signed codes, ``ceil(K·b/32)`` words a row
                                                (8 int4 values a word: two a byte) — format ``pack-quantized``
``m.weight``                           int8     8-bit codes, one a byte — format ``int-quantized`` (W8A8, W8A4)
``m.weight_shape``                     int64    ``[O, K]`` (pack-quantized only)
``m.weight_scale``                     float32  ``[O, G]`` (group), ``[O, 1]`` (channel), ``[1]`` (tensor)
``m.weight_zero_point``                int32/8  asymmetric weights only: signed zero points (packed along O for
                                                pack-quantized group/channel, as compressed-tensors does)
``m.bias``                             float32  the layer bias, if the layer has one
``m.input_scale``                      float32  ``[1]`` static per-tensor activation scale
``m.input_zero_point``                 int8     ``[1]`` its signed zero point (asymmetric only)
``m.morphoquant.weight_codes``         uint8    NF4/FP4 code-book indices, two a byte (not compressed-tensors)
``m.morphoquant.weight_scale``         float32  their scales (code-book weights only)
``m.morphoquant.act_scale``            float32  ``[K]`` static per-input-channel scales (folded into the weights)
``m.morphoquant.act_zero``             int16    ``[K]`` their zero points (asymmetric only, unsigned codes)
``m.morphoquant.act_clip``             float32  ``[K]`` per-channel clip before per-token scaling (when finite)
``m.morphoquant.outlier_idx``          int64    ``[k]`` DABC outlier channels (when k > 0)
``m.morphoquant.outlier_threshold``    float32  ``[k]`` sparse-DABC thresholds
``m.morphoquant.modality_scale``       float32  ``[M+1]`` per-modality range multipliers (row modality from context)
``m.morphoquant.input_perm``           int64    ``[K]`` scale-sorted weight groups (``group_order: act_scale``): the
                                                stored order of the input channels; every ``[K]`` tensor above,
                                                the weight columns and ``outlier_idx`` are in that order, and the
                                                runtime gathers ``x[:, input_perm]`` before quantizing
=====================================  =======  ================================================================

Signed convention: compressed-tensors stores every integer code and zero point in the signed range
``[-2^(b-1), 2^(b-1) - 1]``; MorphoQuant's asymmetric codes are unsigned ``[0, 2^b - 1]``. Both are shifted by
``2^(b-1)`` together, so ``q - z`` — and the dequantized weight — is unchanged.

A module is **standard** when the compressed-tensors tensors alone describe its computation: integer weights
(symmetric, or asymmetric per group/channel), whole groups, activations absent, dynamic per token or static per
tensor, no activation clip and no DABC outliers. Anything else needs the extension and the MorphoQuant runtime.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..layers import ActivationConfig, QuantLinear
from ..numerics import QuantSpec, pack_int4, unpack_int4
from ..statistics.modality import Modality
from .errors import ConfigMismatchError, MissingTensorError

__all__ = ["EXT", "LAYOUT_CODEBOOK", "LAYOUT_INT", "LAYOUT_PACK", "build_quantization_config",
           "check_quantization_config", "decode_module", "encode_module", "module_record", "nonstandard_reasons",
           "record_to_configs", "scheme_key"]

EXT = "morphoquant"
LAYOUT_PACK = "pack-quantized"
LAYOUT_INT = "int-quantized"
LAYOUT_CODEBOOK = "morphoquant-codebook"


# ------------------------------------------------------------------------------------------------ records

def _weight_dict(spec: QuantSpec) -> dict:
    d = {"num_bits": spec.bits, "type": spec.fmt, "symmetric": spec.symmetric, "strategy": spec.granularity,
         "group_size": spec.group_size if spec.granularity == "group" else None}
    if spec.full_range:       # how the scales were chosen; dequantization (s · q) does not depend on it
        d["full_range"] = True
    if spec.group_order != "natural":
        d["group_order"] = spec.group_order
    return d


def _act_dict(act: ActivationConfig | None) -> dict | None:
    if act is None:
        return None
    return {"num_bits": act.spec.bits, "type": "int", "symmetric": act.spec.symmetric,
            "strategy": act.spec.granularity, "dynamic": act.dynamic}


def layout_of(q: QuantLinear) -> str:
    if q.weight_spec.fmt != "int":
        return LAYOUT_CODEBOOK
    if q.weight_spec.bits == 8 and q.act is not None:
        return LAYOUT_INT
    return LAYOUT_PACK


def nonstandard_reasons(q: QuantLinear) -> list[str]:
    """Why ``q`` cannot be described by compressed-tensors alone (empty list: it can)."""
    out = []
    w, act = q.weight_spec, q.act
    if w.fmt != "int":
        out.append(f"{w.fmt} code-book weights")
    if w.granularity == "group" and q.in_features % w.group_size:
        out.append(f"a partial last weight group ({q.in_features} % {w.group_size} != 0)")
    if not w.symmetric and w.granularity == "tensor":
        out.append("asymmetric per-tensor weights")
    if act is not None:
        if act.spec.granularity == "channel":
            out.append("static per-input-channel activation scales (folded into the weights)")
        elif act.spec.granularity == "tensor" and act.dynamic:
            out.append("dynamic per-tensor activations")
    if bool(torch.isfinite(q.act_clip).any()):
        out.append("a per-channel activation clip")
    if q.modality_scale.numel():
        out.append("per-modality activation ranges")
    if q.dabc != "none" and q.outlier_idx.numel():
        out.append(f"DABC ({q.dabc}, {q.outlier_idx.numel()} outlier channels)")
    if _online_hadamard(q):
        out.append("an online Hadamard rotation of the input (QuaRot)")
    if q.permuted:
        out.append("weight groups over scale-sorted input channels (input_perm)")
    return out


def _online_hadamard(q: QuantLinear) -> bool:
    return isinstance(getattr(q, "hadamard_block", None), torch.Tensor) and callable(getattr(q, "hadamard", None))


def module_record(q: QuantLinear) -> dict:
    """The JSON description of a ``QuantLinear`` kept in the manifest (tensors are added by the writer)."""
    return {"in_features": q.in_features, "out_features": q.out_features, "bias": q.bias is not None,
            "weights": _weight_dict(q.weight_spec), "input_activations": _act_dict(q.act), "dabc": q.dabc,
            "outliers": int(q.outlier_idx.numel()), "format": layout_of(q), "online_hadamard": _online_hadamard(q),
            "standard": not nonstandard_reasons(q), "nonstandard_reasons": nonstandard_reasons(q)}


def scheme_key(rec: dict) -> tuple:
    """Modules with equal keys share one ``config_groups`` entry."""
    w, a = rec["weights"], rec["input_activations"]
    return (tuple(sorted(w.items())), tuple(sorted(a.items())) if a else None, rec["format"], rec["dabc"])


def record_to_configs(rec: dict) -> tuple[QuantSpec, ActivationConfig | None]:
    try:
        w = rec["weights"]
        spec = QuantSpec(int(w["num_bits"]), bool(w["symmetric"]), w["strategy"],
                         w["group_size"] if w["strategy"] == "group" else None, w["type"],
                         full_range=bool(w.get("full_range", False)),
                         group_order=w.get("group_order", "natural"))
        a = rec["input_activations"]
        act = None if a is None else ActivationConfig(
            QuantSpec(int(a["num_bits"]), bool(a["symmetric"]), a["strategy"]), bool(a["dynamic"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigMismatchError(f"invalid quantization settings {rec!r}: {e}") from None
    return spec, act


# ------------------------------------------------------------------------------------------------ encode

def _scale_to_disk(s: torch.Tensor, spec: QuantSpec, o: int, n_groups: int) -> torch.Tensor:
    s = s.detach().float()
    if spec.granularity == "group":
        return s.reshape(o, n_groups).contiguous()
    if spec.granularity == "channel":
        return s.reshape(o, 1).contiguous()
    return s.reshape(1).contiguous()


def _scale_from_disk(s: torch.Tensor, spec: QuantSpec, o: int, n_groups: int) -> torch.Tensor:
    if spec.granularity == "group":
        return s.float().reshape(o, n_groups, 1).contiguous()
    if spec.granularity == "channel":
        return s.float().reshape(o, 1).contiguous()
    return s.float().reshape(1, 1).contiguous()


def _n_groups(spec: QuantSpec, k: int) -> int:
    return math.ceil(k / spec.group_size) if spec.granularity == "group" else 1


def _expected_scale_shape(spec: QuantSpec, o: int, k: int) -> list[int]:
    if spec.granularity == "group":
        return [o, _n_groups(spec, k)]
    return [o, 1] if spec.granularity == "channel" else [1]


def _check_integer(t: torch.Tensor, what: str) -> None:
    if t.numel() and not bool((t == torch.round(t)).all()):
        raise ValueError(f"{what} must be integer-valued")


def encode_module(name: str, q: QuantLinear) -> dict[str, torch.Tensor]:
    """The tensors (full checkpoint names) that describe ``q``."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    p = f"{name}."
    x = f"{name}.{EXT}."
    spec, o, k = q.weight_spec, q.out_features, q.in_features
    g = _n_groups(spec, k)
    out: dict[str, torch.Tensor] = {}
    layout = layout_of(q)
    if layout == LAYOUT_CODEBOOK:
        out[x + "weight_codes"] = pack_int4(q.weight_codes.to(torch.uint8), signed=False)
        out[x + "weight_scale"] = _scale_to_disk(q.weight_scale, spec, o, g)
        out[p + "weight_shape"] = torch.tensor([o, k], dtype=torch.int64)
    else:
        off = 0 if spec.symmetric else 2 ** (spec.bits - 1)
        codes = (q.weight_codes.to(torch.int16) - off).to(torch.int8)
        if layout == LAYOUT_INT:
            out[p + "weight"] = codes.contiguous()
        else:
            out[p + "weight_packed"] = pack_to_int32(codes.contiguous(), spec.bits)
            out[p + "weight_shape"] = torch.tensor([o, k], dtype=torch.int64)
        out[p + "weight_scale"] = _scale_to_disk(q.weight_scale, spec, o, g)
        if not spec.symmetric:
            _check_integer(q.weight_zero, f"{name}: weight zero points")
            zp = (_scale_to_disk(q.weight_zero, spec, o, g) - off).to(torch.int8)
            if layout == LAYOUT_PACK and spec.granularity in ("group", "channel"):
                zp = pack_to_int32(zp.contiguous(), spec.bits, packed_dim=0)
            out[p + "weight_zero_point"] = zp.contiguous()
    if q.bias is not None:
        out[p + "bias"] = q.bias.detach().float().contiguous()
    act = q.act
    if act is not None and not act.dynamic:
        a_off = 2 ** (act.spec.bits - 1)
        if act.spec.granularity == "channel":
            out[x + "act_scale"] = q.act_scale.detach().float().reshape(k).contiguous()
            if not act.spec.symmetric:
                _check_integer(q.act_zero, f"{name}: activation zero points")
                out[x + "act_zero"] = q.act_zero.detach().reshape(k).to(torch.int16).contiguous()
        else:
            out[p + "input_scale"] = q.act_scale.detach().float().reshape(1).contiguous()
            if not act.spec.symmetric:
                _check_integer(q.act_zero, f"{name}: activation zero points")
                out[p + "input_zero_point"] = (q.act_zero.detach().reshape(1) - a_off).to(torch.int8)
    if bool(torch.isfinite(q.act_clip).any()):
        out[x + "act_clip"] = q.act_clip.detach().float().reshape(k).contiguous()
    if q.modality_scale.numel():
        out[x + "modality_scale"] = q.modality_scale.detach().float().contiguous()
    if q.dabc != "none" and q.outlier_idx.numel():
        out[x + "outlier_idx"] = q.outlier_idx.detach().to(torch.int64).contiguous()
        if q.dabc == "sparse":
            out[x + "outlier_threshold"] = q.outlier_threshold.detach().float().contiguous()
    if _online_hadamard(q):     # the dense factor of H = H_block ⊗ Sylvester (numerics.hadamard)
        out[x + "hadamard_block"] = q.hadamard_block.detach().float().contiguous()
    if q.permuted:
        out[x + "input_perm"] = q.input_perm.detach().to(torch.int64).contiguous()
    return out


# ------------------------------------------------------------------------------------------------ decode

def decode_module(name: str, rec: dict, take: Callable[[str], torch.Tensor | None]) -> QuantLinear:
    """Rebuild the ``QuantLinear`` of ``rec`` from tensors; ``take(full_name)`` returns a tensor (marking it
    consumed) or ``None`` when absent. Raises :class:`MissingTensorError` / :class:`ConfigMismatchError`."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    spec, act = record_to_configs(rec)
    o, k = int(rec["out_features"]), int(rec["in_features"])
    g = _n_groups(spec, k)
    p, x = f"{name}.", f"{name}.{EXT}."

    def need(key: str) -> torch.Tensor:
        t = take(key)
        if t is None:
            raise MissingTensorError(f"module {name}: tensor {key!r} is missing from the checkpoint")
        return t

    def shape_check(key: str, t: torch.Tensor, shape: list[int], dtype: torch.dtype | None = None) -> None:
        if list(t.shape) != list(shape) or (dtype is not None and t.dtype != dtype):
            raise ConfigMismatchError(
                f"module {name}: tensor {key!r} is {t.dtype}{list(t.shape)} but the quantization settings "
                f"({_describe(rec)}) need {dtype or t.dtype}{list(shape)}")

    layout = rec.get("format")
    if layout not in (LAYOUT_PACK, LAYOUT_INT, LAYOUT_CODEBOOK):
        raise ConfigMismatchError(f"module {name}: unknown weight format {layout!r}")
    if rec.get("online_hadamard"):
        from ..methods.quarot import HadamardQuantLinear
        q = HadamardQuantLinear(k, o, spec, act, bool(rec["bias"]), rec.get("dabc", "none"))
        hb = need(x + "hadamard_block")
        b = int(hb.shape[0]) if hb.dim() == 2 else 0
        if hb.dim() != 2 or hb.shape[0] != hb.shape[1] or b == 0 or k % b or (k // b) & (k // b - 1) or \
                not torch.allclose(hb.float() @ hb.float().T, torch.eye(b), atol=1e-4):
            raise ConfigMismatchError(f"module {name}: hadamard_block of shape {list(hb.shape)} does not factor "
                                      f"the input width {k} (an orthonormal square block of size b, {k} / b a power of two)")
        q.hadamard_block = hb.float().clone()
    else:
        q = QuantLinear(k, o, spec, act, bool(rec["bias"]), rec.get("dabc", "none"))
    if layout == LAYOUT_CODEBOOK:
        shape_check(p + "weight_shape", need(p + "weight_shape"), [2], torch.int64)
        packed = need(x + "weight_codes")
        shape_check(x + "weight_codes", packed, [o, (k + 1) // 2], torch.uint8)
        q.weight_codes = unpack_int4(packed, k, signed=False).to(spec.code_dtype)
        s = need(x + "weight_scale")
        shape_check(x + "weight_scale", s, _expected_scale_shape(spec, o, k), torch.float32)
        q.weight_scale = _scale_from_disk(s, spec, o, g)
        q.weight_zero = torch.zeros_like(q.weight_scale)
    else:
        off = 0 if spec.symmetric else 2 ** (spec.bits - 1)
        if layout == LAYOUT_INT:
            if spec.bits != 8:
                raise ConfigMismatchError(f"module {name}: int-quantized weights must be 8-bit, got {spec.bits}")
            codes = need(p + "weight")
            shape_check(p + "weight", codes, [o, k], torch.int8)
        else:
            shp = need(p + "weight_shape")
            shape_check(p + "weight_shape", shp, [2], torch.int64)
            if shp.tolist() != [o, k]:
                raise ConfigMismatchError(f"module {name}: weight_shape {shp.tolist()} but the module is "
                                          f"[{o}, {k}]")
            packed = need(p + "weight_packed")
            shape_check(p + "weight_packed", packed, [o, math.ceil(k * spec.bits / 32)], torch.int32)
            codes = unpack_from_int32(packed, spec.bits, torch.Size([o, k]))
        q.weight_codes = (codes.to(torch.int16) + off).to(spec.code_dtype).contiguous()
        s = need(p + "weight_scale")
        shape_check(p + "weight_scale", s, _expected_scale_shape(spec, o, k), torch.float32)
        q.weight_scale = _scale_from_disk(s, spec, o, g)
        if spec.symmetric:
            q.weight_zero = torch.zeros_like(q.weight_scale)
        else:
            zp = need(p + "weight_zero_point")
            if layout == LAYOUT_PACK and spec.granularity in ("group", "channel"):
                shape_check(p + "weight_zero_point", zp, [math.ceil(o * spec.bits / 32), g if spec.granularity
                                                          == "group" else 1], torch.int32)
                zp = unpack_from_int32(zp, spec.bits, torch.Size([o, g if spec.granularity == "group" else 1]),
                                       packed_dim=0)
            else:
                shape_check(p + "weight_zero_point", zp, _expected_scale_shape(spec, o, k), torch.int8)
            q.weight_zero = _scale_from_disk(zp.to(torch.float32) + off, spec, o, g)
    if rec["bias"]:
        b = need(p + "bias")
        shape_check(p + "bias", b, [o], torch.float32)
        q.bias = b.clone()
    if act is not None and not act.dynamic:
        a_off = 2 ** (act.spec.bits - 1)
        if act.spec.granularity == "channel":
            s = need(x + "act_scale")
            shape_check(x + "act_scale", s, [k], torch.float32)
            q.act_scale = s.clone()
            if act.spec.symmetric:
                q.act_zero = torch.zeros(k)
            else:
                z = need(x + "act_zero")
                shape_check(x + "act_zero", z, [k], torch.int16)
                q.act_zero = z.float()
        else:
            s = need(p + "input_scale")
            shape_check(p + "input_scale", s, [1], torch.float32)
            q.act_scale = s.clone()
            if act.spec.symmetric:
                q.act_zero = torch.zeros(1)
            else:
                z = need(p + "input_zero_point")
                shape_check(p + "input_zero_point", z, [1], torch.int8)
                q.act_zero = z.float() + a_off
    clip = take(x + "act_clip")
    if clip is not None:
        shape_check(x + "act_clip", clip, [k], torch.float32)
        q.act_clip = clip.clone()
    ms = take(x + "modality_scale")
    if ms is not None:
        shape_check(x + "modality_scale", ms, [len(Modality) + 1], torch.float32)
        q.set_modality_scale(ms)
    n_out = int(rec.get("outliers", 0))
    if q.dabc != "none" and n_out:
        idx = need(x + "outlier_idx")
        shape_check(x + "outlier_idx", idx, [n_out], torch.int64)
        if n_out and (int(idx.min()) < 0 or int(idx.max()) >= k):
            raise ConfigMismatchError(f"module {name}: outlier channel indices outside [0, {k})")
        q.outlier_idx = idx.clone()
        if q.dabc == "sparse":
            thr = need(x + "outlier_threshold")
            shape_check(x + "outlier_threshold", thr, [n_out], torch.float32)
            q.outlier_threshold = thr.clone()
    elif n_out:
        raise ConfigMismatchError(f"module {name}: {n_out} outlier channels recorded but DABC is 'none'")
    perm = take(x + "input_perm")
    if perm is not None:
        shape_check(x + "input_perm", perm, [k], torch.int64)
        if not torch.equal(torch.sort(perm).values, torch.arange(k)):
            raise ConfigMismatchError(f"module {name}: input_perm is not a permutation of 0..{k - 1}")
        q.input_perm = perm.clone()
    return q


def _describe(rec: dict) -> str:
    w, a = rec["weights"], rec["input_activations"]
    s = f"W{w['num_bits']} {w['strategy']}" + (f"{w.get('group_size')}" if w["strategy"] == "group" else "")
    s += " A16" if a is None else f" A{a['num_bits']} {a['strategy']}"
    return s


# ------------------------------------------------------------------------------------------------ config.json

def _ct_args(d: dict | None, role: str):
    """compressed-tensors ``QuantizationArgs`` for one of our weight/activation dicts."""
    from compressed_tensors.quantization import QuantizationArgs

    if d is None:
        return None
    kw = {"num_bits": d["num_bits"], "type": "int", "symmetric": d["symmetric"], "strategy": d["strategy"],
          "dynamic": d.get("dynamic", False) if role == "input" else False}
    if d["strategy"] == "group":
        kw["group_size"] = d["group_size"]
    if role == "input":
        kw["observer"] = None if kw["dynamic"] else "minmax"
    return QuantizationArgs(**kw)


def build_quantization_config(records: dict[str, dict], ignore: list[str], *, format_version: int) -> dict:
    """``config.json["quantization_config"]``.

    All modules standard → a compressed-tensors config (built and validated by the compressed-tensors library:
    ``QuantizationScheme``/``QuantizationConfig``, the format chosen among the compressors that report
    ``can_compress`` for the scheme). Otherwise → ``quant_method: morphoquant`` (so tools without the
    MorphoQuant plugin refuse the checkpoint instead of silently computing something else), with the same
    grouping in our own vocabulary.
    """
    groups: dict[tuple, list[str]] = {}
    for name, rec in records.items():
        groups.setdefault(scheme_key(rec), []).append(name)
    ordered = sorted(groups.items(), key=lambda kv: kv[1][0])
    if all(rec["standard"] for rec in records.values()):
        import compressed_tensors
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
        from torch import nn

        config_groups, formats = {}, set()
        for i, (_, names) in enumerate(ordered):
            rec = records[names[0]]
            scheme = QuantizationScheme(targets=sorted(names), weights=_ct_args(rec["weights"], "weight"),
                                        input_activations=_ct_args(rec["input_activations"], "input"),
                                        format=rec["format"])
            compressor = BaseCompressor.get_value_from_registry(rec["format"])
            if not compressor.can_compress(nn.Linear, scheme):
                raise ValueError(f"compressed-tensors cannot store scheme {scheme} as {rec['format']}")
            config_groups[f"group_{i}"] = scheme
            formats.add(rec["format"])
        qc = QuantizationConfig(config_groups=config_groups, format=formats.pop() if len(formats) == 1
                                else "mixed-precision", quantization_status="compressed", ignore=sorted(ignore))
        data = qc.model_dump(mode="json", exclude={"quant_method"})
        return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
                "sparsity_config": {}, "transform_config": {}, **data}
    config_groups = {}
    for i, (_, names) in enumerate(ordered):
        rec = records[names[0]]
        config_groups[f"group_{i}"] = {"targets": sorted(names), "weights": rec["weights"],
                                       "input_activations": rec["input_activations"], "dabc": rec["dabc"],
                                       "format": rec["format"]}
    return {"quant_method": "morphoquant", "format_version": format_version, "manifest": "morphoquant.json",
            "config_groups": config_groups, "ignore": sorted(ignore)}


_CMP_W = ("num_bits", "symmetric", "strategy")
_CMP_A = ("num_bits", "symmetric", "strategy", "dynamic")


def check_quantization_config(qc: dict, records: dict[str, dict]) -> None:
    """Raise :class:`ConfigMismatchError` unless ``qc`` assigns every module the scheme its record has."""
    if not isinstance(qc, dict):
        raise ConfigMismatchError("config.json has no quantization_config object")
    method = qc.get("quant_method")
    standard = all(r["standard"] for r in records.values())
    want = "compressed-tensors" if standard else "morphoquant"
    if method != want:
        raise ConfigMismatchError(f"config.json quantization_config.quant_method is {method!r}; the manifest "
                                  f"describes a {want} checkpoint")
    if method == "compressed-tensors":
        from compressed_tensors.quantization import QuantizationConfig

        try:
            QuantizationConfig.model_validate({k: v for k, v in qc.items()
                                               if k not in ("version", "sparsity_config", "transform_config")})
        except Exception as e:  # noqa: BLE001 - pydantic and NotImplementedError from validators
            raise ConfigMismatchError(f"config.json quantization_config is not a valid compressed-tensors "
                                      f"config: {e}") from None
    groups = qc.get("config_groups")
    if not isinstance(groups, dict):
        raise ConfigMismatchError("config.json quantization_config has no config_groups")
    assigned: dict[str, dict] = {}
    for gname, g in groups.items():
        if not isinstance(g, dict) or not isinstance(g.get("targets"), list):
            raise ConfigMismatchError(f"config.json quantization_config group {gname!r} is malformed")
        for t in g["targets"]:
            if t in assigned:
                raise ConfigMismatchError(f"config.json assigns module {t!r} to two quantization groups")
            assigned[t] = g
    missing = sorted(set(records) - set(assigned))
    extra = sorted(set(assigned) - set(records))
    if missing or extra:
        raise ConfigMismatchError(
            "config.json quantization_config and the manifest disagree on which modules are quantized: "
            + (f"not in config: {missing[:5]}{'...' if len(missing) > 5 else ''} " if missing else "")
            + (f"only in config: {extra[:5]}{'...' if len(extra) > 5 else ''}" if extra else ""))
    for name, rec in records.items():
        g = assigned[name]
        w, a = g.get("weights") or {}, g.get("input_activations")
        bad = [f"weights.{f}: config {w.get(f)!r} vs tensors {rec['weights'][f]!r}" for f in _CMP_W
               if w.get(f) != rec["weights"][f]]
        if rec["weights"]["strategy"] == "group" and w.get("group_size") != rec["weights"].get("group_size"):
            bad.append(f"weights.group_size: config {w.get('group_size')!r} vs tensors "
                       f"{rec['weights'].get('group_size')!r}")
        ra = rec["input_activations"]
        if (a is None) != (ra is None):
            bad.append(f"input_activations: config {a!r} vs manifest {ra!r}")
        elif a is not None:
            bad += [f"input_activations.{f}: config {a.get(f)!r} vs manifest {ra[f]!r}" for f in _CMP_A
                    if a.get(f) != ra[f]]
        if g.get("format") not in (None, rec["format"]):
            bad.append(f"format: config {g.get('format')!r} vs tensors {rec['format']!r}")
        if method == "morphoquant" and g.get("dabc") != rec["dabc"]:
            bad.append(f"dabc: config {g.get('dabc')!r} vs manifest {rec['dabc']!r}")
        if bad:
            raise ConfigMismatchError(f"config.json disagrees with the checkpoint for module {name}: "
                                      + "; ".join(bad))

"""Recipes: what to quantize and how, as YAML validated by pydantic (unknown keys are errors).

A recipe names a method and its options, the default weight and activation formats, per-stack overrides
(encoder towers of omni models are off unless enabled, each with its own bit widths), calibration settings and
what to do with a layer that received no calibration tokens. Built-in recipes ship as YAML files in
``morphoquant/recipes``; ``load_recipe`` accepts a built-in name or a path.
"""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..layers import ActivationConfig
from ..methods import get_method
from ..numerics import QuantConfigError, QuantSpec


class RecipeError(ValueError):
    """A recipe that cannot be used (unknown keys, impossible values, unknown method)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WeightArgs(_Strict):
    bits: int = 4
    symmetric: bool = True
    granularity: Literal["tensor", "channel", "group"] = "group"
    group_size: int | None = 128
    format: Literal["int", "nf4", "fp4"] = "int"
    allow_partial_groups: bool = False
    """Allow a last, shorter weight group when group_size does not divide the input width."""
    full_range: bool = False
    """Symmetric int weights: scale ``amax / (q_max + ½)`` (as compressed-tensors/llm-compressor do; a 7 % finer
    step at 4 bits, values near +amax clipped by at most half a step) instead of ``amax / q_max``.
    Dequantization is unchanged (``s · q``), so checkpoints and kernels are the same."""
    group_order: Literal["natural", "act_scale"] = "natural"
    """``act_scale``: with static per-input-channel activation scales (folded into the weight), form the weight
    groups over the input channels sorted by that scale (a permutation of the GEMM's reduction axis, the same
    integer sums; see :class:`morphoquant.numerics.QuantSpec`). No effect on layers without such scales."""

    @model_validator(mode="after")
    def _check(self):
        try:
            self.spec()
        except QuantConfigError as e:
            raise ValueError(f"weights: {e}") from None
        return self

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.symmetric, self.granularity,
                         self.group_size if self.granularity == "group" else None, self.format,
                         full_range=self.full_range, group_order=self.group_order)


class ActivationArgs(_Strict):
    bits: int = 16
    """2..8 quantizes the input of every linear; 16 keeps it in full precision."""
    symmetric: bool = True
    granularity: Literal["token", "tensor", "channel"] = "token"
    dynamic: bool | None = None
    """Default: dynamic for token, static for tensor and channel."""

    @model_validator(mode="after")
    def _check(self):
        if self.bits != 16:
            try:
                self.config()
            except (QuantConfigError, ValueError) as e:
                raise ValueError(f"activations: {e}") from None
        return self

    def config(self) -> ActivationConfig | None:
        if self.bits == 16:
            return None
        dynamic = self.dynamic if self.dynamic is not None else self.granularity == "token"
        return ActivationConfig(QuantSpec(self.bits, self.symmetric, self.granularity), dynamic)


class StackArgs(_Strict):
    enabled: bool | None = None
    """None: the adapter's default (decoders on, vision/audio towers off)."""
    weights: WeightArgs | None = None
    activations: ActivationArgs | None = None


class CalibrationArgs(_Strict):
    num_samples: int = Field(16, ge=1)
    seq_len: int = Field(512, ge=2)
    seed: int = 0
    modalities: list[Literal["text", "image", "video", "audio"]] = Field(default_factory=list)
    """Modalities the calibration data must contain (missing ones are an error); empty = no requirement."""
    max_rows_per_layer: int = Field(4096, ge=16)
    """Input rows sampled per linear for methods that search on real activations."""


class GPTQArgs(_Strict):
    damp: float = Field(0.01, gt=0)
    """Dampening added to the Hessian diagonal, as a fraction of its mean."""
    block_size: int = Field(128, ge=1)
    act_order: bool = True
    """Quantize columns in order of decreasing Hessian diagonal (static groups keep their natural order)."""


class Recipe(_Strict):
    name: str = "custom"
    description: str = ""
    method: str = "rtn"
    options: dict = Field(default_factory=dict)
    weights: WeightArgs = Field(default_factory=WeightArgs)
    activations: ActivationArgs = Field(default_factory=ActivationArgs)
    stacks: dict[str, StackArgs] = Field(default_factory=dict)
    weight_method: Literal["rtn", "gptq"] = "rtn"
    """How weights (or folded weights) are rounded, under any activation method."""
    gptq: GPTQArgs = Field(default_factory=GPTQArgs)
    ignore: list[str] = Field(default_factory=list)
    """Linear-name suffixes (relative to a block) never quantized."""
    calibration: CalibrationArgs = Field(default_factory=CalibrationArgs)
    sequential: bool = False
    """Quantize the linears of a block group by group (q/k/v, o, gate/up, down), re-running the block between
    groups so later groups calibrate on quantized upstream outputs."""
    on_empty_layer: Literal["error", "passthrough"] = "error"
    """A layer that saw no calibration tokens: stop with an error, or keep it in full precision and log it."""
    offload: bool = False
    """Keep captured block inputs on disk instead of in memory."""

    @field_validator("method")
    @classmethod
    def _known_method(cls, v):
        get_method(v)
        return v

    @model_validator(mode="after")
    def _validate_options(self):
        method = get_method(self.method)
        try:
            method.Options(**self.options)
        except ValidationError as e:
            raise ValueError(f"options for method {self.method!r}: {e}") from None
        return self

    def method_instance(self):
        return get_method(self.method)(self.options)

    def stack_formats(self, stack: str) -> tuple[QuantSpec, ActivationConfig | None]:
        s = self.stacks.get(stack, StackArgs())
        w = s.weights or self.weights
        a = s.activations or self.activations
        return w.spec(), a.config()

    def stack_enabled(self, stack: str, default: bool) -> bool:
        s = self.stacks.get(stack)
        return default if s is None or s.enabled is None else s.enabled

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()[:16]


def builtin_recipes() -> dict[str, Path]:
    root = resources.files("morphoquant") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".yaml")}


def parse_recipe(data: dict, source: str = "<dict>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping, got {type(data).__name__}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise RecipeError(f"{source}: recipe keys must be names, got {bad_keys!r}")
    try:
        return Recipe(**data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<recipe>"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see `morphoquant recipes` for the schema)"
            lines.append(f"  {loc}: {msg}")
        raise RecipeError(f"invalid recipe {source}:\n" + "\n".join(lines)) from None


#: ``RECIPE@FORMAT`` bit-width presets: (weight bits, activation bits)
FORMATS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a16": (4, 16), "w4a4": (4, 4)}


def with_format(data: dict, fmt: str, source: str = "<recipe>") -> dict:
    """The recipe ``data`` moved to the bit widths of ``fmt`` (a key of :data:`FORMATS`), keeping its method.

    Weights: 8 bits are int8 per output channel (the usual W8 format); 4 bits keep the recipe's 4-bit format
    (group size, NF4 …) or, for an 8-bit recipe, become int4 symmetric in groups of 64. Activations: 16 turns
    them off; 8 or 4 keep the recipe's granularity and symmetry, or use dynamic per-token symmetric when the
    recipe was weight-only. Per-stack overrides are kept. The name becomes ``NAME@fmt``.
    """
    key = fmt.lower()
    if key not in FORMATS:
        raise RecipeError(f"{source}: unknown format {fmt!r} after '@' (choose from {', '.join(FORMATS)})")
    w_bits, a_bits = FORMATS[key]
    out = dict(data)
    w = dict(out.get("weights") or {})
    if w_bits == 8:
        w.update(bits=8, granularity="channel", group_size=None, format="int", group_order="natural")
    elif int(w.get("bits", 4)) != 4:
        w = {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 64}
    a = dict(out.get("activations") or {})
    if a_bits == 16:
        a = {"bits": 16}
    elif int(a.get("bits", 16)) == 16:
        a = {"bits": a_bits, "symmetric": True, "granularity": "token"}
    else:
        a["bits"] = a_bits
    out.update(weights=w, activations=a, name=f"{out.get('name', Path(source).stem)}@{key}")
    return out


def load_recipe(name_or_path: str | Path, overrides: dict | None = None) -> Recipe:
    """A built-in recipe name (``rtn-w4a4`` ...) or a YAML file path, with optional nested overrides.

    ``NAME@FORMAT`` (``gptq-w4a4@w8a8``, ``morpho@w4a8`` …) loads ``NAME`` and moves it to the bit widths of
    ``FORMAT`` (:func:`with_format`); overrides apply after the format."""
    fmt = None
    if isinstance(name_or_path, str) and "@" in name_or_path and not Path(name_or_path).exists():
        name_or_path, fmt = name_or_path.rsplit("@", 1)
    path = _recipe_path(name_or_path)
    data = _read_recipe(path, ())
    if fmt is not None:
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
        data = with_format(data, fmt, str(path))
    if overrides:
        data = _deep_merge(data or {}, overrides)
    return parse_recipe(data, str(path))


def _recipe_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """A built-in recipe's file, or a YAML path (a relative ``base:`` is looked up next to the recipe naming it)."""
    builtins = builtin_recipes()
    if str(name_or_path) in builtins:
        return builtins[str(name_or_path)]
    path = Path(name_or_path)
    if relative_to is not None and not path.is_absolute() and (relative_to.parent / path).exists():
        return relative_to.parent / path
    if not path.exists():
        raise RecipeError(f"no recipe {name_or_path!r}: not a file and not a built-in "
                          f"({', '.join(sorted(builtins))})")
    return path


def _read_recipe(path: Path, chain: tuple[Path, ...]) -> dict | None:
    """The YAML mapping of ``path`` with its ``base:`` chain resolved.

    ``base: NAME`` (a built-in name or a YAML path) starts from that recipe and deep-merges this file over it:
    mappings (``options``, ``weights``, ``calibration`` …) merge key by key, anything else is replaced, so a variant
    names only what it changes. ``name`` and ``description`` must be given by the file itself."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise RecipeError(f"{path}: base must be a built-in recipe name or a YAML path, got {base!r}")
    base_path = _recipe_path(base, path)
    chain = (*chain, path.resolve())
    if base_path.resolve() in chain:
        names = " -> ".join(str(p) for p in (*chain, base_path.resolve()))
        raise RecipeError(f"{path}: recipe bases form a cycle ({names}); remove one of the base: keys")
    parent = _read_recipe(base_path, chain)
    if not isinstance(parent, dict):
        raise RecipeError(f"{path}: its base {base!r} ({base_path}) is not a recipe mapping")
    for own in ("name", "description"):
        parent.pop(own, None)
    return _deep_merge(parent, data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

"""Model adapters: where the blocks of a Hugging Face model are, and what modality each token row carries.

An adapter turns one loaded model into an ordered list of :class:`~morphoquant.pipeline.stack.BlockStack`
objects (encoder towers first, then the decoder) that the layer-wise pipeline consumes. Adapters locate
sub-modules by *class-name suffix* rather than by attribute path, because the module tree differs between
transformers releases (e.g. the Qwen2.5-Omni thinker's text model is ``model.language_model`` in 5.24 but
``model`` in 5.17).

Layering: this package may import :mod:`morphoquant.pipeline.stack` and :mod:`morphoquant.statistics`;
neither of those imports it.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from morphoquant.pipeline.stack import BlockStack, Sample
from morphoquant.statistics.modality import PAD, Modality, constant_modality_ids, modality_context

# Sample keys that carry calibration metadata rather than model inputs; never passed to ``model(**sample)``.
META_KEYS = frozenset({"modality_ids", "sample_id", "id", "text", "meta", "metadata", "source"})


class UnsupportedModelError(ValueError):
    """Raised by :func:`morphoquant.models.get_adapter` when no adapter recognises a model."""

    def __init__(self, model: object, supported: Sequence[str]):
        cls = type(model).__name__
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        what = f"{cls}" + (f" (config.model_type={model_type!r})" if model_type else "")
        msg = (
            f"MorphoQuant has no model adapter for {what}. Supported architectures: {', '.join(supported)}; "
            "plus any Llama/Qwen2/Mistral-like *ForCausalLM whose decoder blocks live in `model.layers`. "
            "Load the checkpoint with one of these classes (e.g. AutoModelForCausalLM for a text-only LLM, "
            "Qwen2_5OmniThinkerForConditionalGeneration for an Omni thinker), or subclass "
            "morphoquant.models.ModelAdapter and register it with morphoquant.models.register_adapter()."
        )
        super().__init__(msg)
        self.model_class = cls
        self.supported = list(supported)


class AdapterWarning(UserWarning):
    """A model matched an adapter but something about it is unexpected (e.g. an unknown linear in a block)."""


@dataclass
class AdapterStack(BlockStack):
    """A :class:`BlockStack` with the extra facts an adapter knows (all optional for the pipeline).

    Attributes:
        modality: the single modality of an encoder tower's rows (``None`` for mixed-modality decoders).
        cross_inputs: linear suffixes (relative to the block) whose *input* is not the block's own token
            sequence, mapped to the modality of the rows they do read. Their input row count differs from
            ``modality_ids(...).numel()`` (Whisper decoder ``encoder_attn.k_proj``/``v_proj`` read the encoder
            output), so per-modality statistics cannot be split for them: treat them as single-modality.
        row_layout: a human-readable description of the hidden-state layout entering the blocks.
        uses_sample: ``sample -> bool``: whether running ``forward(sample)`` reaches this stack's blocks at
            all (a vision tower is not run for a text-only or audio-only sample).
    """

    modality: Modality | None = None
    cross_inputs: dict[str, Modality] = field(default_factory=dict)
    row_layout: str = ""
    uses_sample: Callable[[Sample], bool] | None = None


# --------------------------------------------------------------------------------------------- helpers


def class_name(module: object) -> str:
    return type(module).__name__


def find_modules(root: nn.Module, suffixes: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """Sub-modules of ``root`` (itself included, as ``""``) whose class name ends with one of ``suffixes``."""
    suffixes = tuple(suffixes)
    return [(n, m) for n, m in root.named_modules() if class_name(m).endswith(suffixes)]


def find_module(root: nn.Module, suffixes: Iterable[str], *,
                exclude: Iterable[str] = ()) -> tuple[str, nn.Module]:
    """The outermost sub-module whose class name ends with one of ``suffixes`` (and none of ``exclude``).

    Raises ``LookupError`` when there is none.
    """
    exclude = tuple(exclude)
    hits = [(n, m) for n, m in find_modules(root, suffixes)
            if not (exclude and class_name(m).endswith(exclude))]
    if not hits:
        raise LookupError(f"no sub-module of {class_name(root)} has a class name ending in {tuple(suffixes)}")
    hits.sort(key=lambda nm: (nm[0].count(".") if nm[0] else -1, nm[0]))
    return hits[0]


def block_list(container: nn.Module,
               attrs: Sequence[str] = ("layers", "blocks", "layer")) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of blocks of an encoder/decoder (first attribute of ``attrs`` that is one)."""
    for attr in attrs:
        blocks = getattr(container, attr, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return attr, blocks
    raise LookupError(f"{class_name(container)} has no non-empty ModuleList among {tuple(attrs)}")


def join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


GroupSpec = Sequence[Sequence[Sequence[str]]]
"""A list of groups; each group is a list of alternatives; each alternative a list of linear-name suffixes.

The first alternative whose suffixes all exist in the block is used, so one spec covers several
transformers releases (e.g. DINOv2 ``attention.q_proj`` in 5.24 vs ``attention.attention.query`` before).
"""


def resolve_groups(block: nn.Module, spec: GroupSpec, ignore: Sequence[str] = (), *,
                   stack_name: str = "?") -> list[list[str]]:
    """Concrete ``sequential_groups`` for ``block`` from a :data:`GroupSpec`.

    Groups whose alternatives are all absent are dropped (an optional module). Linears of the block that no
    group covers (and that ``ignore`` does not list) are appended as single-linear groups in registration
    order, with an :class:`AdapterWarning`, so a new transformers release degrades gracefully instead of
    silently skipping them.
    """
    linear_names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    present = set(linear_names)
    groups: list[list[str]] = []
    for alternatives in spec:
        for alt in alternatives:
            if all(s in present for s in alt):
                groups.append(list(alt))
                break
    covered = {s for g in groups for s in g}
    leftovers = [n for n in linear_names
                 if n not in covered and not any(n.endswith(s) for s in ignore)]
    if leftovers:
        warnings.warn(f"stack {stack_name!r}: block {class_name(block)} has linears the adapter does not "
                      f"know {leftovers}; they are appended as their own sequential groups", AdapterWarning,
                      stacklevel=3)
        groups.extend([n] for n in leftovers)
    return groups


def model_inputs(model: nn.Module, sample: Sample) -> dict:
    """The keyword arguments of ``model.forward`` from ``sample``: metadata keys dropped, and keys the forward
    does not accept dropped when it takes no ``**kwargs``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic callables
        params = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out = {}
    for k, v in sample.items():
        if k in META_KEYS or k.startswith("_"):
            continue
        if params and not var_kw and k not in params:
            continue
        out[k] = v
    return out


def accepts_kwarg(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` declares ``name`` explicitly (``**kwargs`` does not count)."""
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def make_forward(model: nn.Module, **extra) -> Callable[[Sample], object]:
    """``sample -> model(**sample, use_cache=False)`` (``use_cache`` only when the forward declares it)."""
    fixed = dict(extra)
    if accepts_kwarg(model, "use_cache"):
        fixed.setdefault("use_cache", False)

    def forward(sample: Sample):
        kwargs = model_inputs(model, sample)
        kwargs.update(fixed)
        return model(**kwargs)

    forward.__qualname__ = f"{class_name(model)}.forward(use_cache=False)"
    return forward


def rows_of(hidden_shape: Sequence[int] | None) -> int | None:
    """Number of token rows in a hidden-state tensor of shape ``[..., H]``."""
    if hidden_shape is None:
        return None
    return math.prod(int(s) for s in tuple(hidden_shape)[:-1])


def token_shape(hidden_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(s) for s in tuple(hidden_shape)[:-1])


def check_rows(ids: torch.Tensor, hidden_shape: Sequence[int] | None, stack: str) -> torch.Tensor:
    """Reshape ``ids`` to the token shape of ``hidden_shape`` (when given); raise if the row counts differ."""
    if hidden_shape is None:
        return ids
    n = rows_of(hidden_shape)
    if ids.numel() != n:
        raise ValueError(f"stack {stack!r}: {ids.numel()} modality ids for hidden states of shape "
                         f"{tuple(hidden_shape)} ({n} token rows); is the sample the one that produced them?")
    return ids.reshape(token_shape(hidden_shape))


def tower_ids(hidden_shape: Sequence[int] | None, modality: Modality, expected_rows: int | None,
              stack: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Constant ids for an encoder tower.

    ``mask`` (1 = real row, 0 = padding; any shape with ``expected_rows`` elements) marks ``PAD`` rows when
    the hidden layout is known to match it. If ``hidden_shape`` disagrees with ``expected_rows`` (an unknown
    layout, e.g. another transformers release), the ids fall back to all-``modality`` over ``hidden_shape``
    without padding, with an :class:`AdapterWarning`. Without ``hidden_shape`` the ids take the mask's shape
    (or ``[expected_rows]``).
    """
    if hidden_shape is None:
        if expected_rows is None:
            raise ValueError(f"stack {stack!r}: hidden_shape is needed to build modality ids for this sample")
        usable = mask is not None and mask.numel() == expected_rows
        hidden_shape = (*(tuple(mask.shape) if usable else (expected_rows,)), 1)
    shape = token_shape(hidden_shape)
    n = rows_of(hidden_shape)
    if expected_rows is not None and n != expected_rows:
        warnings.warn(f"stack {stack!r}: hidden states {tuple(hidden_shape)} have {n} rows but the sample "
                      f"implies {expected_rows}; marking all rows {modality.label} (padding not excluded)",
                      AdapterWarning, stacklevel=3)
        return constant_modality_ids(shape, modality)
    if mask is not None and mask.numel() == n:
        return constant_modality_ids(shape, modality, mask.reshape(shape))
    return constant_modality_ids(shape, modality)


def protected_outside(model: nn.Module, stacks: Sequence[BlockStack], *, prefix: str = "",
                      whole_subtrees: Sequence[str] = ()) -> list[str]:
    """Names (from the model root) of every ``Linear``/``Embedding``/``Conv`` module outside the blocks of
    ``stacks``, plus the given whole sub-trees (e.g. ``talker``): the modules a recipe must never quantize."""
    inside = {id(m) for s in stacks for b in s.blocks for m in b.modules()}
    skip_roots = tuple(t + "." for t in whole_subtrees)
    out = list(whole_subtrees)
    kinds = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    for name, mod in model.named_modules():
        if not name or name.startswith(skip_roots) or name in whole_subtrees:
            continue
        if isinstance(mod, kinds) and id(mod) not in inside:
            out.append(join(prefix, name))
    return out


def is_protected(module_name: str, protected: Iterable[str]) -> bool:
    """Whether ``module_name`` is one of ``protected`` or lies inside one of them."""
    return any(module_name == p or module_name.startswith(p + ".") for p in protected)


# --------------------------------------------------------------------------------------------- base class


class ModelAdapter:
    """Base class of model adapters. Subclasses set ``name`` and the class-name / model-type lists used by
    :meth:`matches`, and implement :meth:`_build_stacks` and :meth:`decoder_modality_ids`.

    Attributes:
        name: adapter name (``"qwen2.5-omni-thinker"``, ``"causal-lm"``, ...).
        architectures: exact model class names this adapter supports (listed in ``SUPPORTED_ARCHITECTURES``).
        model_types: ``config.model_type`` values that match as well (covers renamed classes).
    """

    name: str = "base"
    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        if not self.matches(model):
            raise UnsupportedModelError(model, self.architectures or (self.name,))
        self.model = model
        self._stacks: list[BlockStack] | None = None

    # -- matching ----------------------------------------------------------------------------------
    @classmethod
    def matches(cls, model: object) -> bool:
        if not isinstance(model, nn.Module):
            return False
        if class_name(model) in cls.architectures:
            return True
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return model_type is not None and model_type in cls.model_types

    # -- stacks ------------------------------------------------------------------------------------
    def stacks(self) -> list[BlockStack]:
        """The stacks in quantization order: encoder towers first, then the decoder (built once, cached)."""
        if self._stacks is None:
            self._stacks = self._build_stacks()
        return list(self._stacks)

    def stack(self, name: str) -> BlockStack:
        for s in self.stacks():
            if s.name == name:
                return s
        raise KeyError(f"{self.name}: no stack {name!r}; stacks are {[s.name for s in self.stacks()]}")

    def _build_stacks(self) -> list[BlockStack]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- modality ----------------------------------------------------------------------------------
    def decoder_modality_ids(self, sample: Sample) -> torch.Tensor:  # pragma: no cover - abstract
        """int8 ``[B, T]`` ids of the decoder (main) token sequence, ``PAD`` where ``attention_mask == 0``."""
        raise NotImplementedError

    def attach_modality_context(self) -> None:
        """Make every forward of the model run inside ``modality_context(decoder ids of its inputs)``.

        Layers with per-modality quantizers (per-modality ranges, MQuant-style scales) read the row modalities
        from that context; with this hook a plain ``model(**inputs)`` or ``model.generate(...)`` supplies them.
        Idempotent; an existing outer context (a caller's own ids) is left alone."""
        model = self.model
        if getattr(model, "_morphoquant_modality_hook", None) is not None:
            return
        adapter = self
        active: list = []

        def pre(module, args, kwargs):
            from morphoquant.statistics.modality import current_modality_ids
            if current_modality_ids() is not None:
                active.append(None)
                return
            sample = dict(kwargs)
            if args and isinstance(args[0], torch.Tensor) and "input_ids" not in sample:
                sample["input_ids"] = args[0]
            try:
                ids = adapter.decoder_modality_ids(sample)
            except Exception:   # noqa: BLE001 — inputs without decoder tokens (e.g. embeddings only)
                ids = None
            ctx = modality_context(ids) if ids is not None else None
            if ctx is not None:
                ctx.__enter__()
            active.append(ctx)
            return

        def post(module, args, kwargs, output):
            ctx = active.pop() if active else None
            if ctx is not None:
                ctx.__exit__(None, None, None)

        handles = (model.register_forward_pre_hook(pre, with_kwargs=True),
                   model.register_forward_hook(post, with_kwargs=True, always_call=True))
        model._morphoquant_modality_hook = handles

    # -- protection --------------------------------------------------------------------------------
    def protected_module_names(self) -> list[str]:
        """Module names (from the model root) never quantized; a module inside one is protected too."""
        return protected_outside(self.model, self.stacks())

    # -- samples -----------------------------------------------------------------------------------
    def make_sample(self, **kwargs) -> dict:
        """A model-ready sample from keyword tensors (lists converted; ``attention_mask`` defaults to 1)."""
        sample = {k: (torch.as_tensor(v) if isinstance(v, (list, tuple)) else v) for k, v in kwargs.items()}
        ids = sample.get("input_ids")
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 1:
                sample["input_ids"] = ids = ids.unsqueeze(0)
            sample.setdefault("attention_mask", torch.ones_like(ids))
        return sample

    def __repr__(self) -> str:
        return f"{type(self).__name__}({class_name(self.model)})"


__all__ = [
    "META_KEYS", "PAD", "AdapterStack", "AdapterWarning", "GroupSpec", "ModelAdapter",
    "UnsupportedModelError", "accepts_kwarg", "block_list", "check_rows", "class_name", "find_module",
    "find_modules", "is_protected",
    "make_forward", "model_inputs", "protected_outside", "resolve_groups", "rows_of", "tower_ids",
]

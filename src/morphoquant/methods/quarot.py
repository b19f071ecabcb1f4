"""QuaRot-style rotation (after Ashkboos et al., 2024): random Hadamard on the residual stream, online Hadamard
before down_proj, then round-to-nearest (or GPTQ) weights and per-token activations.

**Computational invariance.** In a pre-norm decoder with RMSNorm, ``RMSNorm(h) = h / rms(h) ⊙ γ``. Fold ``γ``
into every linear that reads a norm (``W ← W diag(γ)``, ``γ ← 1``; the final norm into ``lm_head``); then the norm
is ``h / rms(h)``, which commutes with any orthogonal ``Q`` (``rms(hQ) = rms(h)``). Rotating the residual stream
``h ↦ hQ`` everywhere leaves the function unchanged:

* writers of the stream — token embeddings ``E ← E Q``, ``o_proj``/``down_proj`` ``W ← Qᵀ W`` (bias ``b ← b Q``),
  and the multimodal towers' output projections (Qwen2.5-Omni ``audio_tower.proj``, ``visual.merger.mlp.2``);
* readers — ``q/k/v_proj``, ``gate/up_proj``, ``lm_head``: ``W ← W Q``.

``Q = diag(±1) · H / √n`` is a random Hadamard matrix (seeded signs; any width through
:mod:`morphoquant.numerics.hadamard`). It spreads outlier channels over all channels, so per-token activation
scales stop being dominated by a few of them.

**Online Hadamard before down_proj.** ``down_proj``'s input (after the gated activation) is not on the stream;
QuaRot rotates it at run time, ``x ↦ x H`` (fast transform, ``O(n log n)``), and folds ``H`` into the weight,
``W_down ← W_down H`` (``x H (W H)ᵀ = x Wᵀ``). :class:`HadamardLinear` (full precision, used during
calibration so statistics and Hessians see the rotated input) and :class:`HadamardQuantLinear` carry it.

**Value/output heads** (``rotate_ov``, free): per head ``v ← v H_d`` (``v_proj`` rows), and ``o_proj``'s input
columns of each head ``← · H_d``; attention mixes tokens, not channels, so this commutes.

The rotation runs once in :meth:`QuaRot.prepare` over the whole model (before the block loop). Supported:
Llama/Qwen2/Mistral-style decoders (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, RMSNorms), also
inside Qwen2.5-Omni thinker / Qwen2.5-VL (towers' output projections rotated too; the towers' own blocks, when
enabled, are quantized without rotation). Anything else raises :class:`UnsupportedRotationError`. Tied
embeddings are untied: the input side becomes ``E Q`` and ``lm_head`` ``E diag(γ_final) Q``, no longer the same
matrix (``config.tie_word_embeddings`` is set to false). The final hidden states of a rotated model are in the
rotated basis, without ``γ_final``: :func:`unrotate_hidden_states` maps them back for fidelity metrics.
"""
from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import nn

from ..layers import QuantLinear
from ..numerics.hadamard import HadamardFactor, hadamard_factor, hadamard_transform, random_signs
from .base import BlockContext, Method, MethodOptions, register

__all__ = [
    "HadamardLinear",
    "HadamardQuantLinear",
    "QuaRot",
    "QuaRotOptions",
    "UnsupportedRotationError",
    "rotatable_stacks",
    "rotate_model",
    "unrotate_hidden_states",
]

#: tower output projections that write into the decoder's residual stream (module-name suffixes)
TOWER_OUTPUTS = ("audio_tower.proj", "visual.merger.mlp.2")
TOWER_ROOTS = ("audio_tower", "visual", "vision_tower", "vision_model", "audio_model")


class UnsupportedRotationError(ValueError):
    """The model has no decoder this rotation supports (or a part it cannot rotate consistently)."""


# ------------------------------------------------------------------------------------------------ online Hadamard

def _factor_from_block(n: int, block: torch.Tensor, kind: str = "stored") -> HadamardFactor:
    b = block.shape[0]
    return HadamardFactor(n, n // b, block, kind)


def _online_hook(module, args):
    x = args[0]
    return (hadamard_transform(x, module.hadamard()), *args[1:])


class HadamardLinear(nn.Linear):
    """``nn.Linear`` whose input is rotated, ``x ↦ x H``, before the product (weight already ``W H``).

    The rotation is a forward *pre-hook* registered at construction, so observers hooked later (statistics,
    Hessians) see the rotated input, as the quantized layer will."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block: torch.Tensor | None = None):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("hadamard_block", torch.ones(1, 1) if block is None else block.float().clone())
        self.register_forward_pre_hook(_online_hook)

    def hadamard(self) -> HadamardFactor:
        return _factor_from_block(self.in_features, self.hadamard_block)

    @classmethod
    def wrap(cls, linear: nn.Linear, factor: HadamardFactor) -> HadamardLinear:
        """``linear`` with ``W ← W H`` and the run-time rotation (same function)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, factor.block)
        with torch.no_grad():
            new.weight.copy_(hadamard_transform(linear.weight.detach().float(), factor).to(linear.weight.dtype))
            if linear.bias is not None:
                new.bias.copy_(linear.bias.detach())
        return new.to(linear.weight.device)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", online_hadamard"


class HadamardQuantLinear(QuantLinear):
    """``QuantLinear`` applied to ``x H`` (online Hadamard; the quantized weight is that of ``W H``)."""

    def __init__(self, in_features, out_features, weight_spec, act, bias, dabc="none"):
        super().__init__(in_features, out_features, weight_spec, act, bias, dabc)
        self.register_buffer("hadamard_block", torch.ones(1, 1))

    def hadamard(self) -> HadamardFactor:
        return _factor_from_block(self.in_features, self.hadamard_block)

    def forward(self, x, *args, **kwargs):
        return super().forward(hadamard_transform(x, self.hadamard()), *args, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", online_hadamard"


def quantize_online(linear: nn.Module, quant_cls, *args, **kwargs) -> QuantLinear:
    """``quant_cls.from_linear`` for a :class:`HadamardLinear` (the online block is carried over)."""
    q = quant_cls.from_linear(linear, *args, **kwargs)
    q.hadamard_block = linear.hadamard_block.detach().clone()
    return q


# ------------------------------------------------------------------------------------------------ rotation

def _is_rmsnorm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor) and \
        getattr(m, "bias", None) is None


def _llama_like(block: nn.Module) -> bool:
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if attn is None or mlp is None:
        return False
    lin = all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
        and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
    norms = all(_is_rmsnorm(getattr(block, n, nn.Identity())) for n in ("input_layernorm", "post_attention_layernorm"))
    return lin and norms


def rotatable_stacks(stacks) -> list:
    return [s for s in stacks if s.blocks and all(_llama_like(b) for b in s.blocks)]


def _norm_checks(norm: nn.Module) -> bool:
    """``norm(x) = norm₁(x) ⊙ γ`` (γ foldable) and ``norm₁(x Q) = norm₁(x) Q`` (rotation invariant)."""
    c = norm.weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, c, generator=gen)
    probe = copy.deepcopy(norm).float()
    with torch.no_grad():
        y = probe(x)
        gamma = probe.weight.detach().clone()
        probe.weight.fill_(1.0)
        y1 = probe(x)
        q, _ = torch.linalg.qr(torch.randn(c, c, generator=gen, dtype=torch.float64))
        q = q.float()
        y2 = probe(x @ q)
    return bool(torch.allclose(y, y1 * gamma, rtol=1e-4, atol=1e-5) and
                torch.allclose(y2, y1 @ q, rtol=1e-3, atol=1e-4))


def _find_decoder(model: nn.Module, block: nn.Module) -> nn.Module:
    for _, m in model.named_modules():
        layers = getattr(m, "layers", None)
        if isinstance(layers, nn.ModuleList) and any(b is block for b in layers):
            return m
    raise UnsupportedRotationError("cannot find the module holding the decoder layers")


class _Rot:
    """``x ↦ x Q`` with ``Q = diag(signs) H`` on the last axis."""

    def __init__(self, n: int, seed: int, max_block: int):
        self.n = n
        self.signs = random_signs(n, seed)
        self.factor = hadamard_factor(n, max_block=max_block, seed=seed)

    def rows(self, w: torch.Tensor) -> torch.Tensor:              # every row r ↦ r Q
        return hadamard_transform(w.float() * self.signs, self.factor)

    def cols(self, w: torch.Tensor) -> torch.Tensor:              # W ↦ Qᵀ W
        return self.rows(w.float().T).T

    def inverse_rows(self, h: torch.Tensor) -> torch.Tensor:      # r ↦ r Qᵀ
        hh = h.float()
        q = self.matrix()
        return hh @ q.T

    def matrix(self) -> torch.Tensor:
        return self.rows(torch.eye(self.n))


@torch.no_grad()
def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


def _tower_outputs(model: nn.Module) -> list[str]:
    """Names of the tower output linears (:data:`TOWER_OUTPUTS`); every tower root must have one."""
    towers = [name for name, mod in model.named_modules()
              if isinstance(mod, nn.Linear) and any(name == s or name.endswith("." + s) for s in TOWER_OUTPUTS)]
    for r in [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in TOWER_ROOTS]:
        if not any(t.startswith(r + ".") for t in towers):
            raise UnsupportedRotationError(f"tower {r} writes into the decoder stream through a module this "
                                           "rotation does not know")
    return towers


@torch.no_grad()
def rotate_model(model: nn.Module, stacks, seed: int = 0, online_down_proj: bool = True, rotate_ov: bool = True,
                 max_block: int = 512) -> dict:
    """Rotate ``model`` in place (module docstring); returns a summary. Only the stacks of
    :func:`rotatable_stacks` are rotated; raises :class:`UnsupportedRotationError` when there is none."""
    rot_stacks = rotatable_stacks(stacks)
    if not rot_stacks:
        raise UnsupportedRotationError(
            f"QuaRot-style rotation supports Llama/Qwen2-style decoders (self_attn q/k/v/o_proj, gated MLP, "
            f"RMSNorm); {type(model).__name__} has none among its stacks "
            f"({', '.join(s.name for s in stacks) or 'none'})")
    if len(rot_stacks) > 1:
        raise UnsupportedRotationError("more than one rotatable decoder stack; not supported")
    stack = rot_stacks[0]
    if any(type(m).__name__.endswith("Talker") or n.endswith("talker") for n, m in model.named_children()):
        raise UnsupportedRotationError(
            "the model has a talker that reads the thinker's hidden states; rotate the thinker alone "
            "(load Qwen2_5OmniThinkerForConditionalGeneration)")
    blocks = stack.blocks
    decoder = _find_decoder(model, blocks[0])
    embed = getattr(decoder, "embed_tokens", None)
    final_norm = getattr(decoder, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(embed, nn.Embedding) or final_norm is None or not _is_rmsnorm(final_norm) or \
            not isinstance(head, nn.Linear):
        raise UnsupportedRotationError(
            f"{type(model).__name__}: expected embed_tokens, a final RMSNorm and an lm_head Linear around the decoder")
    for norm in [final_norm] + [getattr(b, n) for b in blocks for n in ("input_layernorm", "post_attention_layernorm")]:
        if not _norm_checks(norm):
            raise UnsupportedRotationError(f"{type(norm).__name__} is not a plain RMSNorm (γ·x/rms(x))")
    hidden = embed.weight.shape[1]
    # what else writes into the stream: declared by the model (extra embedding tables, tower output linears)
    # or, for the Qwen2.5-Omni layout, found by name
    declared = getattr(model, "residual_stream_writers", None)
    extra_embeds, towers = declared() if declared is not None else ([], _tower_outputs(model))
    for name in towers:
        if model.get_submodule(name).out_features != hidden:
            raise UnsupportedRotationError(f"{name} writes {model.get_submodule(name).out_features} channels, "
                                           f"the stream has {hidden}")
    # untie
    if head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    for cfg in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None),
                getattr(getattr(model, "config", None), "get_text_config", lambda: None)()):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False

    r = _Rot(hidden, seed, max_block)
    final_gamma = final_norm.weight.detach().float().clone()

    def fold_norm(norm, linears):
        g = norm.weight.detach().float()
        for lin in linears:
            _set(lin.weight, lin.weight.detach().float() * g.reshape(1, -1))
        norm.weight.fill_(1.0)

    def read(lin):
        _set(lin.weight, r.rows(lin.weight.detach()))

    def write(lin):
        _set(lin.weight, r.cols(lin.weight.detach()))
        if lin.bias is not None:
            _set(lin.bias, r.rows(lin.bias.detach().reshape(1, -1)).reshape(-1))

    _set(embed.weight, r.rows(embed.weight.detach()))
    for e in extra_embeds:
        _set(e.weight, r.rows(e.weight.detach()))
    for name in towers:
        write(model.get_submodule(name))
    fold_norm(final_norm, [head])
    read(head)
    online = []
    for b in blocks:
        at, mlp = b.self_attn, b.mlp
        fold_norm(b.input_layernorm, [at.q_proj, at.k_proj, at.v_proj])
        fold_norm(b.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for lin in (at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj):
            read(lin)
        for lin in (at.o_proj, mlp.down_proj):
            write(lin)
        if rotate_ov:
            hd = getattr(at, "head_dim", None)
            if hd and at.v_proj.out_features % hd == 0 and at.o_proj.in_features % hd == 0:
                f = hadamard_factor(hd, max_block=max_block, seed=seed)
                wv = at.v_proj.weight.detach().float()                      # rows per kv head: W_h ← Hᵀ W_h
                wv = hadamard_transform(wv.T.reshape(-1, hd), f).reshape(wv.shape[1], -1).T
                _set(at.v_proj.weight, wv)
                if at.v_proj.bias is not None:
                    _set(at.v_proj.bias, hadamard_transform(at.v_proj.bias.detach().float().reshape(-1, hd), f)
                         .reshape(-1))
                wo = at.o_proj.weight.detach().float()                      # columns per head: W_h ← W_h H
                _set(at.o_proj.weight, hadamard_transform(wo.reshape(wo.shape[0], -1, hd), f).reshape(wo.shape))
        if online_down_proj:
            d = mlp.down_proj
            f = hadamard_factor(d.in_features, max_block=max_block, seed=seed)
            mlp.down_proj = HadamardLinear.wrap(d, f)
            online.append(f.kind)
    info = {"stack": stack.name, "hidden": hidden, "residual_hadamard": r.factor.kind, "seed": seed,
            "towers": towers, "online_down_proj": online[0] if online else "off", "rotate_ov": rotate_ov}
    model.morphoquant_rotation = {"signs": r.signs, "seed": seed, "max_block": max_block,
                                  "final_norm_weight": final_gamma, "hidden": hidden}
    return info


def unrotate_hidden_states(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states of a rotated model back in the original basis: ``(h Qᵀ) ⊙ γ_final``
    (identity for a model that was not rotated)."""
    meta = getattr(model, "morphoquant_rotation", None)
    if meta is None:
        return hidden
    r = _Rot(meta["hidden"], meta["seed"], meta["max_block"])
    r.signs = meta["signs"]
    return (r.inverse_rows(hidden.reshape(-1, hidden.shape[-1])) * meta["final_norm_weight"]).reshape(
        hidden.shape).to(hidden.dtype)


# ------------------------------------------------------------------------------------------------ method

class QuaRotOptions(MethodOptions):
    seed: int = 0
    """Seed of the random Hadamard signs (and of a random-orthogonal fallback factor)."""
    online_down_proj: bool = True
    rotate_ov: bool = True
    max_block: int = Field(512, ge=1)
    """Largest dense Paley factor of a non-power-of-two Hadamard (beyond: random orthogonal odd factor)."""
    clip_ratio: float = Field(1.0, gt=0, le=1)
    """Shrinks static activation ranges (per-token activations use their own range)."""


@register
class QuaRot(Method):
    name = "quarot"
    Options = QuaRotOptions

    def prepare(self, model, stacks, global_stats) -> dict:
        o = self.options
        info = rotate_model(model, stacks, o.seed, o.online_down_proj, o.rotate_ov, o.max_block)
        return {"rotation": info}

    def restore(self, model, stacks, state) -> None:
        self.prepare(model, stacks, None)      # the rotation is a deterministic function of the seed

    def quantize_linear(self, ctx: BlockContext, name: str, linear: nn.Linear) -> QuantLinear:
        rng = self.static_range(ctx, name)
        if rng is not None and self.options.clip_ratio != 1.0:
            rng = (rng[0] * self.options.clip_ratio, rng[1] * self.options.clip_ratio)
        kw = {"act_range": rng, "weight_quantizer": ctx.weight_quantizer(name)}
        rot = ctx.global_state.get("rotation", {})
        ctx.report.setdefault(name, {})["rotated"] = ctx.stack == rot.get("stack")
        if isinstance(linear, HadamardLinear):
            return quantize_online(linear, HadamardQuantLinear, ctx.weight_spec, ctx.act, **kw)
        return QuantLinear.from_linear(linear, ctx.weight_spec, ctx.act, **kw)

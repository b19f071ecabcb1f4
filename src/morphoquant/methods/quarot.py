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

**LayerNorm encoder–decoders (Whisper).** ``LN(h) = γ ⊙ (h − μ(h)) / √(var(h) + ε) + β`` is not rotation
invariant, but on a *centred* stream it is an RMSNorm: with ``C = I − 11ᵀ/n``, ``LN(h C) = γ ⊙ RMSNorm₁(h C) + β``.
So every writer of a stream also centres what it writes (``W ← Qᵀ C W``, ``b ← (b − mean b) Q``, embedding rows
``e ← (e − mean e) Q``), every LayerNorm becomes a plain ``RMSNorm₁`` (no weight), and its ``γ, β`` fold into the
readers (``W ← W diag(γ) Q``, ``b ← b + W β``; a key projection without bias drops ``W β``, which adds the same
amount to every score of a query and cancels in the softmax; ``proj_out`` gains the bias ``W β``). The encoder
and the decoder streams get their own ``Q``; the encoder's final norm is read by every cross-attention
``k/v_proj``. The encoder stream starts as ``GELU(conv2(·)) + P``, which no linear writes: a pre-hook maps the
input of encoder block 0 to ``(h − μ) Q`` (one ``n × n`` product per frame, full precision), installed for the
duration of each encoder forward only, so the pipeline's direct calls of the block (on already mapped captured
inputs) are not mapped twice. ``fc2`` (``fc1 → GELU → fc2``) gets the online Hadamard of ``down_proj``.
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
    "online_hadamard_linear",
    "quantize_online",
    "rotatable_stacks",
    "rotate_model",
    "unrotate_hidden_states",
    "unrotate_residual_stream",
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

    def inverse_rows(self, h: torch.Tensor) -> torch.Tensor:      # r ↦ r Qᵀ = (r Hᵀ) ⊙ signs
        return hadamard_transform(h.float(), self.factor, inverse=True) * self.signs


@torch.no_grad()
def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def _write_stream(lin: nn.Linear, r: _Rot, centre: bool = False) -> None:
    """A writer of the stream outputs ``y Q`` (``W ← Qᵀ W``, ``b ← b Q``); with ``centre``, ``(y − μ(y)) Q``
    (``W ← Qᵀ C W``, ``b ← (b − mean b) Q``: the LayerNorm rotation keeps the stream centred)."""
    w = lin.weight.detach().float()
    _set(lin.weight, r.cols(w - w.mean(0, keepdim=True) if centre else w))
    if lin.bias is not None:
        b = lin.bias.detach().float()
        _set(lin.bias, r.rows((b - b.mean() if centre else b).reshape(1, -1)).reshape(-1))


def online_hadamard_linear(linear: nn.Linear, seed: int, max_block: int) -> tuple[HadamardLinear, str]:
    """``linear`` with the online Hadamard of its input (QuaRot's rotation before down_proj / fc2), and the
    Hadamard factor's kind."""
    f = hadamard_factor(linear.in_features, max_block=max_block, seed=seed)
    return HadamardLinear.wrap(linear, f), f.kind


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
    if not rot_stacks and _whisper_like(model):
        return _rotate_encoder_decoder(model, stacks, seed, online_down_proj, rotate_ov, max_block)
    if not rot_stacks:
        raise UnsupportedRotationError(
            f"QuaRot-style rotation supports Llama/Qwen2-style decoders (self_attn q/k/v/o_proj, gated MLP, "
            f"RMSNorm) and Whisper-style LayerNorm encoder-decoders; {type(model).__name__} has none among its stacks "
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

    _set(embed.weight, r.rows(embed.weight.detach()))
    for e in extra_embeds:
        _set(e.weight, r.rows(e.weight.detach()))
    for name in towers:
        _write_stream(model.get_submodule(name), r)
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
            _write_stream(lin, r)
        if rotate_ov:
            _rotate_heads(at, at.v_proj, at.o_proj, seed, max_block)
        if online_down_proj:
            mlp.down_proj, kind = online_hadamard_linear(mlp.down_proj, seed, max_block)
            online.append(kind)
    info = {"stack": stack.name, "hidden": hidden, "residual_hadamard": r.factor.kind, "seed": seed,
            "towers": towers, "online_down_proj": online[0] if online else "off", "rotate_ov": rotate_ov}
    model.morphoquant_rotation = {"signs": r.signs, "seed": seed, "max_block": max_block,
                                  "final_norm_weight": final_gamma, "hidden": hidden}
    return info


@torch.no_grad()
def _rotate_heads(attn: nn.Module, v_proj: nn.Linear, o_proj: nn.Linear, seed: int, max_block: int) -> None:
    """Per head ``v ← v H_d`` (rows of ``v_proj``, and its bias) and ``o_proj``'s input columns of each head
    ``← · H_d``; attention mixes tokens, not channels, so the block's function is unchanged."""
    hd = getattr(attn, "head_dim", None)
    if not hd or v_proj.out_features % hd or o_proj.in_features % hd:
        return
    f = hadamard_factor(hd, max_block=max_block, seed=seed)
    wv = v_proj.weight.detach().float()                              # rows per kv head: W_h ← Hᵀ W_h
    _set(v_proj.weight, hadamard_transform(wv.T.reshape(-1, hd), f).reshape(wv.shape[1], -1).T)
    if v_proj.bias is not None:
        _set(v_proj.bias, hadamard_transform(v_proj.bias.detach().float().reshape(-1, hd), f).reshape(-1))
    wo = o_proj.weight.detach().float()                              # columns per head: W_h ← W_h H
    _set(o_proj.weight, hadamard_transform(wo.reshape(wo.shape[0], -1, hd), f).reshape(wo.shape))


# ---------------------------------------------------------------- LayerNorm encoder-decoders (Whisper)

def _is_layernorm(m) -> bool:
    return isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 and m.elementwise_affine


def _prenorm_ln_block(block: nn.Module, cross: bool) -> bool:
    """``self_attn_layer_norm → self_attn(q, k, v, out_proj)``, [``encoder_attn_layer_norm → encoder_attn``],
    ``final_layer_norm → fc1 → act → fc2``, all LayerNorms (the Whisper layer layout)."""
    attns = ["self_attn"] + (["encoder_attn"] if cross else [])
    norms = ["self_attn_layer_norm", "final_layer_norm"] + (["encoder_attn_layer_norm"] if cross else [])
    return all(isinstance(getattr(getattr(block, a, None), n, None), nn.Linear)
               for a in attns for n in ("q_proj", "k_proj", "v_proj", "out_proj")) and \
        all(isinstance(getattr(block, n, None), nn.Linear) for n in ("fc1", "fc2")) and \
        all(_is_layernorm(getattr(block, n, None)) for n in norms)


def _whisper_parts(model: nn.Module):
    core = getattr(model, "model", model)
    enc, dec = getattr(core, "encoder", None), getattr(core, "decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return enc, dec, head


def _whisper_like(model: nn.Module) -> bool:
    enc, dec, head = _whisper_parts(model)
    if enc is None or dec is None or not isinstance(head, nn.Linear):
        return False
    ok_enc = isinstance(getattr(enc, "layers", None), nn.ModuleList) and len(enc.layers) > 0 and \
        all(_prenorm_ln_block(b, cross=False) for b in enc.layers) and _is_layernorm(getattr(enc, "layer_norm", None))
    ok_dec = isinstance(getattr(dec, "layers", None), nn.ModuleList) and len(dec.layers) > 0 and \
        all(_prenorm_ln_block(b, cross=True) for b in dec.layers) and _is_layernorm(getattr(dec, "layer_norm", None)) \
        and isinstance(getattr(dec, "embed_tokens", None), nn.Embedding) and \
        isinstance(getattr(dec, "embed_positions", None), nn.Embedding)
    return ok_enc and ok_dec


class _EntranceRotation:
    """``h ↦ (h − μ(h)) Q`` on the hidden states entering ``owner.layers[0]``, applied once per forward of
    ``owner``: the pre-hook on block 0 exists only during that forward (installed first, so the pipeline's
    input-capture hook sees mapped inputs), and direct calls of the block are left alone."""

    def __init__(self, owner: nn.Module, rot: _Rot):
        self.rot = rot
        self._handle = None
        owner.register_forward_pre_hook(self._arm)
        owner.register_forward_hook(self._disarm, always_call=True)

    def _arm(self, owner, args):
        self._disarm()
        self._handle = owner.layers[0].register_forward_pre_hook(self._apply, with_kwargs=True, prepend=True)

    def _disarm(self, *_):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _apply(self, block, args, kwargs):
        self._disarm()
        if args:
            return (self.map(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.map(kwargs["hidden_states"])}

    def map(self, h: torch.Tensor) -> torch.Tensor:
        hf = h.float()
        hc = hf - hf.mean(-1, keepdim=True)
        return self.rot.rows(hc.reshape(-1, hc.shape[-1])).reshape(h.shape).to(h.dtype)


@torch.no_grad()
def _rotate_encoder_decoder(model: nn.Module, stacks, seed: int, online_down_proj: bool, rotate_ov: bool,
                            max_block: int) -> dict:
    """The LayerNorm encoder-decoder rotation of the module docstring (Whisper), in place."""
    enc, dec, head = _whisper_parts(model)
    hidden = dec.embed_tokens.weight.shape[1]
    if enc.layer_norm.normalized_shape[0] != hidden:
        raise UnsupportedRotationError("encoder and decoder widths differ; not supported")
    r_enc, r_dec = _Rot(hidden, seed, max_block), _Rot(hidden, seed + 1, max_block)
    if head.weight is dec.embed_tokens.weight:          # untie: the head reads the decoder's final norm
        head.weight = nn.Parameter(dec.embed_tokens.weight.detach().clone(), requires_grad=False)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        cfg.tie_word_embeddings = False
    final_gamma = dec.layer_norm.weight.detach().float().clone()
    final_beta = dec.layer_norm.bias.detach().float().clone() if dec.layer_norm.bias is not None else None

    def embed(table, r):
        e = table.weight.detach().float()
        _set(table.weight, r.rows(e - e.mean(-1, keepdim=True)))

    def fold(owner, norm_name, readers):                 # LN → RMSNorm₁, (γ, β) into the readers, x ↦ x Q
        ln = getattr(owner, norm_name)
        g = ln.weight.detach().float()
        beta = ln.bias.detach().float() if ln.bias is not None else None
        for lin, r, softmax_key in readers:
            w = lin.weight.detach().float()
            if beta is not None and not softmax_key:
                shift = w @ beta
                if lin.bias is None:
                    lin.bias = nn.Parameter(shift.to(lin.weight.dtype), requires_grad=False)
                else:
                    _set(lin.bias, lin.bias.detach().float() + shift)
            _set(lin.weight, r.rows(w * g.reshape(1, -1)))
        setattr(owner, norm_name, nn.RMSNorm(ln.normalized_shape, eps=ln.eps, elementwise_affine=False)
                .to(ln.weight.device))

    def block(b, r, cross):
        at = b.self_attn
        fold(b, "self_attn_layer_norm", [(at.q_proj, r, False), (at.k_proj, r, True), (at.v_proj, r, False)])
        _write_stream(at.out_proj, r, centre=True)
        if cross:
            fold(b, "encoder_attn_layer_norm", [(b.encoder_attn.q_proj, r, False)])
            _write_stream(b.encoder_attn.out_proj, r, centre=True)
        fold(b, "final_layer_norm", [(b.fc1, r, False)])
        _write_stream(b.fc2, r, centre=True)
        if rotate_ov:
            _rotate_heads(at, at.v_proj, at.out_proj, seed, max_block)
            if cross:
                _rotate_heads(b.encoder_attn, b.encoder_attn.v_proj, b.encoder_attn.out_proj, seed, max_block)
        if online_down_proj:
            b.fc2, kind = online_hadamard_linear(b.fc2, seed, max_block)
            return kind
        return "off"

    _EntranceRotation(enc, r_enc)
    online = [block(b, r_enc, False) for b in enc.layers]
    # the encoder's final norm is read by every cross-attention k/v (encoder stream)
    fold(enc, "layer_norm", [(lin, r_enc, key) for b in dec.layers
                             for lin, key in ((b.encoder_attn.k_proj, True), (b.encoder_attn.v_proj, False))])
    embed(dec.embed_tokens, r_dec)
    embed(dec.embed_positions, r_dec)
    online += [block(b, r_dec, True) for b in dec.layers]
    fold(dec, "layer_norm", [(head, r_dec, False)])
    names = [s.name for s in stacks if s.blocks and (s.blocks[0] is enc.layers[0] or s.blocks[0] is dec.layers[0])]
    model.morphoquant_rotation = {"signs": r_dec.signs, "seed": seed + 1, "max_block": max_block,
                                  "final_norm_weight": final_gamma, "final_norm_bias": final_beta, "hidden": hidden,
                                  "layernorm_to_rmsnorm": True}
    return {"stack": names[0] if len(names) == 1 else None, "stacks": names, "hidden": hidden,
            "residual_hadamard": r_dec.factor.kind, "seed": seed, "towers": [],
            "online_down_proj": online[0] if online else "off", "rotate_ov": rotate_ov, "layernorm_to_rmsnorm": True}


def unrotate_residual_stream(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A rotated RMSNorm decoder's residual stream (any block's output, before the final norm) back in the
    original basis: ``h Qᵀ``, exact because every writer of the stream was rotated by the same orthogonal ``Q``
    (identity for a model that was not rotated). Refused for the LayerNorm encoder–decoder rotation, whose writers
    also centre what they write, so its stream differs from the original by more than ``Q``."""
    meta = getattr(model, "morphoquant_rotation", None)
    if meta is None:
        return hidden
    if meta.get("layernorm_to_rmsnorm"):
        raise ValueError("this model's LayerNorms were turned into RMSNorms by the rotation: its residual stream is "
                         "centred as well as rotated and cannot be mapped back block by block; compare final "
                         "hidden states with unrotate_hidden_states instead")
    return _stored_rotation(meta).inverse_rows(hidden.reshape(-1, hidden.shape[-1])).reshape(hidden.shape) \
        .to(hidden.dtype)


def _stored_rotation(meta: dict) -> _Rot:
    """The residual-stream rotation a rotated model recorded in ``morphoquant_rotation``."""
    r = _Rot(meta["hidden"], meta["seed"], meta["max_block"])
    r.signs = meta["signs"]
    return r


def unrotate_hidden_states(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states of a rotated model back in the original basis: ``(h Qᵀ) ⊙ γ_final``
    (``+ β_final`` after a LayerNorm's rotation; identity for a model that was not rotated)."""
    meta = getattr(model, "morphoquant_rotation", None)
    if meta is None:
        return hidden
    out = _stored_rotation(meta).inverse_rows(hidden.reshape(-1, hidden.shape[-1])) * meta["final_norm_weight"]
    if meta.get("final_norm_bias") is not None:            # a LayerNorm's β (encoder-decoder rotation)
        out = out + meta["final_norm_bias"]
    return out.reshape(hidden.shape).to(hidden.dtype)


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
        ctx.report.setdefault(name, {})["rotated"] = ctx.stack == rot.get("stack") or ctx.stack in rot.get("stacks", ())
        if isinstance(linear, HadamardLinear):
            return quantize_online(linear, HadamardQuantLinear, ctx.weight_spec, ctx.act, **kw)
        return QuantLinear.from_linear(linear, ctx.weight_spec, ctx.act, **kw)

"""Qwen2.5-Omni: the thinker (vision tower, audio tower, text decoder) and the full model (only its thinker).

Row layouts (transformers 5.24, checked on a tiny random model):

* ``vision`` — ``Qwen2_5OmniVisionBlock`` receives ``[L, H]``: all patches of all images of the call
  flattened, *re-ordered into attention windows* (``window_index``). The tower is called once for
  ``pixel_values`` (images) and again for ``pixel_values_videos``, images first. Ids are constant per call, so
  the window permutation does not matter. There is no padding.
* ``audio`` — ``Qwen2_5OmniAudioEncoderLayer`` receives ``[L, H]``: the valid frames after the stride-2 conv
  of every audio in the batch, concatenated; feature padding (``feature_attention_mask == 0``) has already
  been removed by the model, so every row is audio. ``L = sum_i ceil(len_i / 2)``.
* ``text`` — decoder layers receive ``[B, T, H]``; placeholder tokens map to image / video / audio.

The full ``Qwen2_5OmniForConditionalGeneration`` has no usable ``forward``; its stacks run ``model.thinker``.
``talker`` and ``token2wav`` are never touched and are listed whole by ``protected_module_names``.
"""
from __future__ import annotations

import torch
from torch import nn

from morphoquant.models.base import (
    AdapterStack,
    GroupSpec,
    ModelAdapter,
    block_list,
    find_module,
    make_forward,
    protected_outside,
    resolve_groups,
    rows_of,
    tower_ids,
)
from morphoquant.models.causal_lm import DECODER_GROUPS, decoder_token_ids, is_decoder_block
from morphoquant.pipeline.stack import BlockStack, Sample
from morphoquant.statistics.modality import Modality

#: Qwen2.5 vision block: 5.24 Omni has separate ``attn.q/k/v``; Qwen2.5-VL a fused ``attn.qkv``.
VISION_GROUPS: GroupSpec = [
    [["attn.qkv"], ["attn.q", "attn.k", "attn.v"]],
    [["attn.proj"]],
    [["mlp.gate_proj", "mlp.up_proj"], ["mlp.fc1"]],
    [["mlp.down_proj"], ["mlp.fc2"]],
]

#: Whisper-style encoder block (Qwen2.5-Omni audio tower, Whisper encoder).
AUDIO_GROUPS: GroupSpec = [
    [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]],
    [["self_attn.out_proj"]],
    [["fc1"]],
    [["fc2"]],
]


def config_token_id(config, *names: str) -> int | None:
    """First integer attribute among ``names`` on ``config``.

    (5.24 Omni thinker config: ``image_token_index``; Qwen2.5-VL: ``image_token_id``.)
    """
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int):
            return v
    return None


def grid_rows(grid_thw: torch.Tensor | None, pixels: torch.Tensor | None) -> int:
    """Patch rows the vision tower sees for one call (``sum(t*h*w)``; else ``pixels.shape[0]``)."""
    if grid_thw is not None:
        return int(torch.as_tensor(grid_thw).prod(-1).sum())
    return int(pixels.shape[0]) if pixels is not None else 0


def vision_tower_ids(sample: Sample, hidden_shape, stack: str = "vision") -> torch.Tensor:
    """Ids for one call of a Qwen2.5 vision tower.

    Rule: the tower runs images (``pixel_values``) first, then videos (``pixel_values_videos``), in two calls.
    The rows are IMAGE when the sample has only images, VIDEO when it has only videos. With both, the row
    count of ``hidden_shape`` picks the call: image rows → IMAGE, video rows → VIDEO, image+video rows (both
    calls concatenated) → IMAGE rows then VIDEO rows; when image and video row counts are equal the first call
    (IMAGE) is assumed. A pipeline that stops at the first call sees only the images of a mixed sample, so
    calibrate the tower's video statistics with video-only samples.
    """
    has_img = sample.get("pixel_values") is not None
    has_vid = sample.get("pixel_values_videos") is not None
    n_img = grid_rows(sample.get("image_grid_thw"), sample.get("pixel_values")) if has_img else 0
    n_vid = grid_rows(sample.get("video_grid_thw"), sample.get("pixel_values_videos")) if has_vid else 0
    n = rows_of(hidden_shape)
    if has_img and has_vid:
        if n is None or n == n_img:
            return tower_ids(hidden_shape, Modality.IMAGE, n_img, stack)
        if n == n_vid:
            return tower_ids(hidden_shape, Modality.VIDEO, n_vid, stack)
        if n == n_img + n_vid:
            ids = torch.cat([tower_ids(None, Modality.IMAGE, n_img, stack),
                             tower_ids(None, Modality.VIDEO, n_vid, stack)])
            return ids.reshape(tuple(hidden_shape)[:-1])
        return tower_ids(hidden_shape, Modality.IMAGE, n_img, stack)  # warns: unknown layout
    if has_vid:
        return tower_ids(hidden_shape, Modality.VIDEO, n_vid, stack)
    if has_img:
        return tower_ids(hidden_shape, Modality.IMAGE, n_img, stack)
    if hidden_shape is None:
        raise ValueError(f"stack {stack!r}: the sample has no pixel_values / pixel_values_videos")
    return tower_ids(hidden_shape, Modality.IMAGE, None, stack)


def has_visual_inputs(sample: Sample) -> bool:
    return sample.get("pixel_values") is not None or sample.get("pixel_values_videos") is not None


def audio_feature_lengths(sample: Sample) -> torch.Tensor | None:
    """Mel-frame length of every audio in the sample (from ``feature_attention_mask`` when present)."""
    mask = sample.get("feature_attention_mask")
    if mask is not None:
        return mask.sum(-1).long().cpu()
    lens = sample.get("audio_feature_lengths")
    if lens is not None:
        return torch.as_tensor(lens).long().cpu()
    feats = sample.get("input_features")
    if feats is not None:
        return torch.full((feats.shape[0],), feats.shape[-1], dtype=torch.long)
    return None


def audio_tower_ids(sample: Sample, hidden_shape, stack: str = "audio") -> torch.Tensor:
    """Ids for the Qwen2.5-Omni audio tower: all AUDIO; padded frames were dropped by the model
    (rows = ``sum(ceil(len_i / 2))``), so there is no PAD row."""
    lens = audio_feature_lengths(sample)
    expected = None if lens is None else int(((lens - 1) // 2 + 1).sum())
    return tower_ids(hidden_shape, Modality.AUDIO, expected, stack)


def vision_tower_stack(vblocks, fwd) -> AdapterStack:
    """The Qwen2.5 vision tower as a stack (shared by the Omni thinker and Qwen2.5-VL adapters): off by default,
    image (or video) rows flattened over the whole call."""
    return AdapterStack(
        name="vision", blocks=list(vblocks), forward=fwd,
        modality_ids=lambda s, h: vision_tower_ids(s, h, "vision"),
        default_enabled=False,
        sequential_groups=resolve_groups(vblocks[0], VISION_GROUPS, stack_name="vision"),
        modality=Modality.IMAGE,
        row_layout="[L, H]: patches of all images (or all videos) of one call, flattened and "
                   "window-permuted; images call first, then videos; no padding",
        uses_sample=has_visual_inputs,
    )


class QwenOmniThinkerAdapter(ModelAdapter):
    """``Qwen2_5OmniThinkerForConditionalGeneration``: ``vision``, ``audio`` (towers, off by default),
    ``text``."""

    name = "qwen2.5-omni-thinker"
    architectures = ("Qwen2_5OmniThinkerForConditionalGeneration",)
    model_types = ("qwen2_5_omni_thinker",)

    def __init__(self, model):
        super().__init__(model)
        self.thinker, self.prefix = self._thinker(model)
        t = self.thinker
        self.vision_path, self.visual = find_module(t, ("VisionEncoder", "VisionTransformerPretrainedModel"))
        self.audio_path, self.audio_tower = find_module(t, ("AudioEncoder",))
        self.text_path, self.text_model = self._text_model(t)
        cfg = t.config
        self.token_modality: dict[int, Modality] = {}
        for modality, names in ((Modality.IMAGE, ("image_token_id", "image_token_index")),
                                (Modality.VIDEO, ("video_token_id", "video_token_index")),
                                (Modality.AUDIO, ("audio_token_id", "audio_token_index"))):
            tid = config_token_id(cfg, *names)
            if tid is not None:
                self.token_modality[tid] = modality

    @staticmethod
    def _thinker(model) -> tuple[nn.Module, str]:
        return model, ""

    def _text_model(self, thinker: nn.Module) -> tuple[str, nn.Module]:
        try:
            return find_module(thinker, ("ThinkerTextModel",))
        except LookupError:
            pass
        towers = (self.visual, self.audio_tower)
        for name, mod in thinker.named_modules():  # 5.17 fallback: the ModuleList of decoder layers
            layers = getattr(mod, "layers", None)
            if (isinstance(layers, nn.ModuleList) and len(layers) and is_decoder_block(layers[0])
                    and all(mod is not t for t in towers)):
                return name, mod
        raise LookupError(f"no text decoder found in {type(thinker).__name__}")

    def _build_stacks(self) -> list[BlockStack]:
        fwd = make_forward(self.thinker)
        _, vblocks = block_list(self.visual, ("blocks", "layers"))
        _, ablocks = block_list(self.audio_tower, ("layers",))
        _, tblocks = block_list(self.text_model, ("layers",))
        return [
            vision_tower_stack(vblocks, fwd),
            AdapterStack(
                name="audio", blocks=list(ablocks), forward=fwd,
                modality_ids=lambda s, h: audio_tower_ids(s, h, "audio"),
                default_enabled=False,
                sequential_groups=resolve_groups(ablocks[0], AUDIO_GROUPS, stack_name="audio"),
                modality=Modality.AUDIO,
                row_layout="[L, H]: valid post-conv frames of every audio, concatenated (padding removed)",
                uses_sample=lambda s: s.get("input_features") is not None,
            ),
            AdapterStack(
                name="text", blocks=list(tblocks), forward=fwd,
                modality_ids=lambda s, h: decoder_token_ids(s, self.token_modality, h, "text"),
                default_enabled=True,
                sequential_groups=resolve_groups(tblocks[0], DECODER_GROUPS, stack_name="text"),
                modality=None,
                row_layout="[B, T, H] decoder tokens; placeholder tokens carry image/video/audio embeddings",
                uses_sample=lambda s: True,
            ),
        ]

    def decoder_modality_ids(self, sample: Sample) -> torch.Tensor:
        return decoder_token_ids(sample, self.token_modality)

    def protected_module_names(self) -> list[str]:
        return protected_outside(self.thinker, self.stacks(), prefix=self.prefix)

    def make_sample(self, **kwargs) -> dict:
        sample = super().make_sample(**kwargs)
        feats = sample.get("input_features")
        if feats is not None and sample.get("feature_attention_mask") is None:
            sample["feature_attention_mask"] = torch.ones(feats.shape[0], feats.shape[-1], dtype=torch.long)
        return sample


class QwenOmniAdapter(QwenOmniThinkerAdapter):
    """Full ``Qwen2_5OmniForConditionalGeneration``: the thinker's stacks; talker and token2wav protected."""

    name = "qwen2.5-omni"
    architectures = ("Qwen2_5OmniForConditionalGeneration",)
    model_types = ("qwen2_5_omni",)

    @staticmethod
    def _thinker(model) -> tuple[nn.Module, str]:
        thinker = getattr(model, "thinker", None)
        if not isinstance(thinker, nn.Module):
            raise TypeError(f"{type(model).__name__} has no `thinker` sub-module")
        return thinker, "thinker"

    def protected_module_names(self) -> list[str]:
        # every top-level child other than the thinker (talker, token2wav, ...) is protected whole
        whole = [n for n, _ in self.model.named_children() if n != self.prefix]
        return whole + protected_outside(self.thinker, self.stacks(), prefix=self.prefix)

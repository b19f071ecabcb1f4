"""Whisper (``WhisperForConditionalGeneration``): audio ``encoder`` + text ``decoder`` stacks.

Row layouts (transformers 5.24):

* ``encoder`` — ``WhisperEncoderLayer`` receives ``[B, S, H]`` with ``S = max_source_positions`` (the mel
  input must be exactly ``2 S`` frames; Whisper attends to its padding). If the sample has the feature
  extractor's frame mask as ``attention_mask`` (``[B, 2 S]``), position ``j`` is PAD when frame ``2 j`` is
  padding (conv2 has stride 2); the model itself ignores that mask.
* ``decoder`` — ``WhisperDecoderLayer`` receives ``[B, T, H]`` from ``decoder_input_ids`` (PAD from
  ``decoder_attention_mask``). The cross-attention ``encoder_attn.k_proj`` / ``encoder_attn.v_proj`` read the
  *encoder* output ``[B, S, H]`` (third positional argument of the layer), so their input row count is
  ``B*S``, not ``B*T``: see ``AdapterStack.cross_inputs``.
"""
from __future__ import annotations

import torch

from morphoquant.models.base import (
    AdapterStack,
    GroupSpec,
    ModelAdapter,
    block_list,
    find_module,
    make_forward,
    resolve_groups,
    tower_ids,
)
from morphoquant.models.causal_lm import decoder_token_ids
from morphoquant.models.qwen_omni import AUDIO_GROUPS
from morphoquant.pipeline.stack import BlockStack, Sample
from morphoquant.statistics.modality import Modality

WHISPER_DECODER_GROUPS: GroupSpec = [
    [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]],
    [["self_attn.out_proj"]],
    [["encoder_attn.q_proj"]],
    [["encoder_attn.k_proj", "encoder_attn.v_proj"]],  # input: encoder output (cross_inputs)
    [["encoder_attn.out_proj"]],
    [["fc1"]],
    [["fc2"]],
]

CROSS_INPUTS = {"encoder_attn.k_proj": Modality.AUDIO, "encoder_attn.v_proj": Modality.AUDIO}


class WhisperAdapter(ModelAdapter):
    name = "whisper"
    architectures = ("WhisperForConditionalGeneration",)
    model_types = ("whisper",)

    @classmethod
    def matches(cls, model) -> bool:
        # WhisperForAudioClassification / WhisperForCausalLM share model_type "whisper" but lack a part
        if not super().matches(model):
            return False
        try:
            find_module(model, ("WhisperEncoder",))
            find_module(model, ("WhisperDecoder",))
        except LookupError:
            return False
        return True

    def __init__(self, model):
        super().__init__(model)
        self.encoder_path, self.encoder = find_module(model, ("WhisperEncoder",))
        self.decoder_path, self.decoder = find_module(model, ("WhisperDecoder",))
        self._forward = make_forward(model)

    # -- samples ---------------------------------------------------------------------------------------
    def _start_token(self) -> int:
        cfg = self.model.config
        for n in ("decoder_start_token_id", "bos_token_id"):
            v = getattr(cfg, n, None)
            if isinstance(v, int):
                return v
        gen = getattr(self.model, "generation_config", None)
        v = getattr(gen, "decoder_start_token_id", None)
        return v if isinstance(v, int) else 0

    def _with_decoder_inputs(self, sample: Sample) -> Sample:
        if sample.get("decoder_input_ids") is not None or sample.get("decoder_inputs_embeds") is not None:
            return sample
        feats = sample.get("input_features")
        b = feats.shape[0] if feats is not None else 1
        out = dict(sample)
        out["decoder_input_ids"] = torch.full((b, 1), self._start_token(), dtype=torch.long)
        return out

    def forward(self, sample: Sample):
        """The full model on ``sample`` (``decoder_input_ids`` defaults to ``[[decoder_start_token_id]]``)."""
        return self._forward(self._with_decoder_inputs(sample))

    def make_sample(self, **kwargs) -> dict:
        sample = {k: (torch.as_tensor(v) if isinstance(v, (list, tuple)) else v) for k, v in kwargs.items()}
        sample = self._with_decoder_inputs(sample)
        dec = sample.get("decoder_input_ids")
        if dec is not None:
            if dec.dim() == 1:
                sample["decoder_input_ids"] = dec = dec.unsqueeze(0)
            sample.setdefault("decoder_attention_mask", torch.ones_like(dec))
        return sample

    # -- modality ids ----------------------------------------------------------------------------------
    def encoder_ids(self, sample: Sample, hidden_shape=None) -> torch.Tensor:
        feats = sample.get("input_features")
        s = int(self.model.config.max_source_positions)
        if feats is not None:
            b = int(feats.shape[0])
        else:
            b = int(hidden_shape[0]) if hidden_shape is not None else 1
        mask = sample.get("attention_mask")
        frame_mask = None
        if mask is not None and mask.dim() == 2 and mask.shape[-1] == 2 * s and mask.shape[0] == b:
            frame_mask = mask[:, ::2].cpu()
        if hidden_shape is None:
            hidden_shape = (b, s, 1)
        return tower_ids(hidden_shape, Modality.AUDIO, b * s, "encoder", frame_mask)

    def decoder_ids(self, sample: Sample, hidden_shape=None) -> torch.Tensor:
        sample = self._with_decoder_inputs(sample)
        dec = {"input_ids": sample.get("decoder_input_ids"),
               "attention_mask": sample.get("decoder_attention_mask"),
               "inputs_embeds": sample.get("decoder_inputs_embeds")}
        return decoder_token_ids({k: v for k, v in dec.items() if v is not None}, {}, hidden_shape, "decoder")

    def decoder_modality_ids(self, sample: Sample) -> torch.Tensor:
        return self.decoder_ids(sample)

    # -- stacks ----------------------------------------------------------------------------------------
    def _build_stacks(self) -> list[BlockStack]:
        _, eblocks = block_list(self.encoder, ("layers",))
        _, dblocks = block_list(self.decoder, ("layers",))
        return [
            AdapterStack(
                name="encoder", blocks=list(eblocks), forward=self.forward,
                modality_ids=self.encoder_ids, default_enabled=True,
                sequential_groups=resolve_groups(eblocks[0], AUDIO_GROUPS, stack_name="encoder"),
                modality=Modality.AUDIO,
                row_layout="[B, S, H], S = max_source_positions = mel frames / 2; "
                           "PAD from attention_mask[:, ::2]",
                uses_sample=lambda s: s.get("input_features") is not None,
            ),
            AdapterStack(
                name="decoder", blocks=list(dblocks), forward=self.forward,
                modality_ids=self.decoder_ids, default_enabled=True,
                sequential_groups=resolve_groups(dblocks[0], WHISPER_DECODER_GROUPS, stack_name="decoder"),
                modality=Modality.TEXT,
                cross_inputs=dict(CROSS_INPUTS),
                row_layout="[B, T, H] decoder tokens (PAD from decoder_attention_mask); "
                           "encoder_attn.k_proj/v_proj read the encoder output [B, S, H]",
                uses_sample=lambda s: True,
            ),
        ]

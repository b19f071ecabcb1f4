"""OmniMini: a small, real, fully offline omni-modal model in the shape of the Qwen2.5-Omni thinker.

Parts (all frozen except the projectors):

* decoder: the real SmolLM2-135M (``LlamaForCausalLM``, 30 layers x 576), weights unmodified;
* image tower: the real DINOv2-S/14 (12 layers x 384); an easy-VQA 64x64 image is resized to
  ``image_size`` (112 px: 8x8 patches) and the patch tokens are average-pooled ``image_pool`` x ``image_pool``
  (2x2 -> a 4x4 grid = 16 image tokens);
* audio tower: the real Whisper tiny.en encoder (4 layers x 384), run on the clip's own length (no 30 s
  padding: ``T_enc = ceil(L_mel / 2)`` frames of 20 ms); ``audio_stack`` (4) consecutive frames are
  concatenated into one 1536-wide row, so one audio token covers 80 ms: ``n_audio = ceil(T_enc / 4)``;
* projectors (the only trained weights): ``Linear -> GELU -> Linear`` into the decoder embedding space, plus a
  small learnable embedding table for the ids the decoder vocabulary lacks (placeholders and begin/end markers).

Token ids ``>= vocab_size`` are OmniMini's own: ``V + 0`` image placeholder, ``V + 1`` audio placeholder,
``V + 2/3`` image begin/end, ``V + 4/5`` audio begin/end. Placeholder embeddings are replaced, in order, by the
projected tower tokens; markers take their rows of ``extra_embeddings``. The decoder's embedding matrix and
``lm_head`` stay exactly as shipped, so text-only inputs give SmolLM2's own logits.

The adapter (:class:`OmniMiniAdapter`) exposes ``vision`` / ``audio`` (towers, 16-bit by default) and ``text``
stacks with per-token modality ids exactly like the Qwen2.5-Omni thinker adapter: placeholder rows are image /
audio, everything else (markers included) is text, padding is ``PAD``.

Layering: imports ``pipeline.stack``, ``statistics`` and ``methods.mquant`` (lower layers) only; the zoo
assembles the real parts (``morphoquant.zoo.load_model("omnimini")``).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from morphoquant.methods.mquant import modality_context
from morphoquant.models.base import (
    AdapterStack,
    ModelAdapter,
    block_list,
    check_rows,
    make_forward,
    protected_outside,
    resolve_groups,
    tower_ids,
)
from morphoquant.models.causal_lm import DECODER_GROUPS, decoder_token_ids
from morphoquant.models.dinov2 import DINOV2_GROUPS
from morphoquant.models.qwen_omni import AUDIO_GROUPS
from morphoquant.pipeline.stack import BlockStack, Sample
from morphoquant.statistics.modality import Modality, constant_modality_ids

#: The packaged projector weights (trained by ``scripts/train_omnimini.py``).
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "omnimini"
PROJECTOR_FILE = "projectors.safetensors"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTRA_TOKENS = ("<|image_pad|>", "<|audio_pad|>", "<|image_start|>", "<|image_end|>",
                "<|audio_start|>", "<|audio_end|>")


@dataclass
class OmniMiniConfig:
    """Shapes and token ids of OmniMini (stored as JSON in the projector file's metadata)."""

    vocab_size: int = 49152            # decoder vocabulary; OmniMini's own ids follow it
    text_hidden: int = 576             # decoder embedding width
    image_hidden: int = 384            # DINOv2-S width
    audio_hidden: int = 384            # Whisper tiny encoder width
    image_size: int = 112
    patch_size: int = 14
    image_pool: int = 2
    audio_stack: int = 4
    image_projector_hidden: int = 576
    audio_projector_hidden: int = 1152
    decoder: str = "smollm2-135m"
    image_encoder: str = "dinov2-s"
    audio_encoder: str = "whisper-tiny.en"
    model_type: str = "omnimini"
    extra: dict = field(default_factory=dict)

    @property
    def image_token_id(self) -> int:
        return self.vocab_size

    @property
    def audio_token_id(self) -> int:
        return self.vocab_size + 1

    @property
    def image_start_id(self) -> int:
        return self.vocab_size + 2

    @property
    def image_end_id(self) -> int:
        return self.vocab_size + 3

    @property
    def audio_start_id(self) -> int:
        return self.vocab_size + 4

    @property
    def audio_end_id(self) -> int:
        return self.vocab_size + 5

    @property
    def grid(self) -> int:
        """Patch grid side of the pooled image: ``image_size / patch_size / image_pool``."""
        return self.image_size // self.patch_size // self.image_pool

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid

    def audio_tokens(self, mel_frames: int) -> int:
        """Audio tokens for a clip of ``mel_frames`` log-mel frames (10 ms each): ``ceil(ceil(L / 2) / k)``."""
        return math.ceil(math.ceil(int(mel_frames) / 2) / self.audio_stack)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> OmniMiniConfig:
        data = json.loads(text)
        data.pop("model_type", None)
        return cls(**data)


class Projector(nn.Module):
    """``y = W2 GELU(W1 x + b1) + b2``: tower features (after pooling) -> decoder embeddings."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class OmniMiniError(ValueError):
    """An OmniMini input that does not fit (placeholder count, audio too long, ...)."""


def pool_patches(hidden: torch.Tensor, grid: int, pool: int) -> torch.Tensor:
    """DINOv2 ``[N, 1 + P, H]`` (CLS first) -> ``[N, (grid/pool)^2, H]``: patch tokens average-pooled in
    ``pool x pool`` windows (row-major)."""
    n, rows, h = hidden.shape
    if rows != 1 + grid * grid:
        raise OmniMiniError(f"DINOv2 returned {rows} rows, expected 1 + {grid}x{grid}; is the image "
                            f"{grid * 14} px square?")
    patches = hidden[:, 1:].reshape(n, grid, grid, h).permute(0, 3, 1, 2)
    pooled = nn.functional.avg_pool2d(patches, pool)
    return pooled.flatten(2).transpose(1, 2)


def stack_frames(frames: torch.Tensor, k: int) -> torch.Tensor:
    """``[T, H]`` encoder frames -> ``[ceil(T/k), k*H]``: ``k`` consecutive frames concatenated (the last group
    is padded by repeating the last frame)."""
    t, h = frames.shape
    n = math.ceil(t / k)
    if n * k != t:
        frames = torch.cat([frames, frames[-1:].expand(n * k - t, h)])
    return frames.reshape(n, k * h)


class OmniMiniForConditionalGeneration(nn.Module):
    """DINOv2-S + Whisper tiny.en encoder + SmolLM2-135M with trained projectors (see module docstring).

    Build with :meth:`from_parts` (real parts: ``morphoquant.zoo.load_model("omnimini")``).
    """

    def __init__(self, config: OmniMiniConfig, language_model: nn.Module, vision_tower: nn.Module,
                 audio_tower: nn.Module):
        super().__init__()
        self.omni_config = config
        self.language_model = language_model
        self.vision_tower = vision_tower
        self.audio_tower = audio_tower
        self.image_projector = Projector(config.image_hidden, config.image_projector_hidden, config.text_hidden)
        self.audio_projector = Projector(config.audio_hidden * config.audio_stack, config.audio_projector_hidden,
                                         config.text_hidden)
        self.extra_embeddings = nn.Embedding(len(EXTRA_TOKENS), config.text_hidden)
        for module in (self.language_model, self.vision_tower, self.audio_tower):
            module.requires_grad_(False)
        self._init_projectors()

    # -- construction ------------------------------------------------------------------------------
    @property
    def config(self):
        """The decoder's config (position limit etc.); OmniMini's own shapes are ``omni_config``."""
        return self.language_model.config

    def _init_projectors(self, seed: int = 0) -> None:
        """Deterministic init; output rows start at the RMS of the decoder's token embeddings."""
        g = torch.Generator().manual_seed(seed)
        emb = self.language_model.get_input_embeddings().weight
        rms = float(emb.detach().float().pow(2).mean().sqrt())
        for proj in (self.image_projector, self.audio_projector):
            for lin, std in ((proj.fc1, lin_std(proj.fc1)), (proj.fc2, rms / math.sqrt(proj.fc2.in_features))):
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
                    lin.bias.zero_()
        with torch.no_grad():
            self.extra_embeddings.weight.copy_(torch.randn(self.extra_embeddings.weight.shape, generator=g) * rms)

    @classmethod
    def from_parts(cls, language_model: nn.Module, vision_tower: nn.Module, audio_tower: nn.Module,
                   projector_path: str | Path | None = None, config: OmniMiniConfig | None = None
                   ) -> OmniMiniForConditionalGeneration:
        """Assemble OmniMini. ``audio_tower`` is a ``WhisperEncoder`` (or a whole Whisper model, whose encoder
        is taken). With ``projector_path`` the trained projector weights (and config) are loaded from it."""
        enc = getattr(getattr(audio_tower, "model", None), "encoder", None)
        if enc is not None:
            audio_tower = enc
        if projector_path is not None:
            tensors, config = load_projectors(projector_path)
        config = config or OmniMiniConfig(
            vocab_size=language_model.get_input_embeddings().num_embeddings,
            text_hidden=language_model.get_input_embeddings().embedding_dim,
            image_hidden=vision_tower.config.hidden_size, audio_hidden=audio_tower.config.d_model,
            patch_size=vision_tower.config.patch_size)
        model = cls(config, language_model, vision_tower, audio_tower)
        if projector_path is not None:
            missing, unexpected = model.load_state_dict(tensors, strict=False)
            own = {k for k in model.state_dict() if k.split(".")[0] in TRAINED_PREFIXES}
            if own & set(missing) or unexpected:
                raise OmniMiniError(f"{projector_path} does not fit this OmniMini: missing "
                                    f"{sorted(own & set(missing))}, unexpected {sorted(unexpected)}")
        return model.eval()

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights only (projectors and extra embeddings)."""
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] in TRAINED_PREFIXES}

    # -- towers ------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> pooled DINOv2 patch features ``[N, image_tokens, 384]`` (before the projector)."""
        ids = constant_modality_ids((pixel_values.shape[0], 1 + (pixel_values.shape[-1] // 14) ** 2),
                                    Modality.IMAGE)
        with modality_context(ids):
            hidden = self.vision_tower(pixel_values=pixel_values).last_hidden_state
        cfg = self.omni_config
        return pool_patches(hidden, pixel_values.shape[-1] // cfg.patch_size, cfg.image_pool)

    def encode_audio(self, input_features: torch.Tensor,
                     feature_attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Whisper encoder on each clip's own length: ``[N, 80, L]`` log-mels (+ ``[N, L]`` mask) -> one
        ``[ceil(L_i / 2), 384]`` tensor per clip. Clips of a batch are padded to the longest and masked out of
        the attention, so every clip gives the same frames as when encoded alone."""
        enc = self.audio_tower
        n, _, length = input_features.shape
        lens = (feature_attention_mask.sum(-1).long() if feature_attention_mask is not None
                else torch.full((n,), length, dtype=torch.long))
        t_enc = (lens + 1) // 2
        t_max = (length + 1) // 2
        if t_max > enc.embed_positions.num_embeddings:
            raise OmniMiniError(f"audio of {length} mel frames is longer than Whisper's 30 s; cut it into "
                                "clips of at most 30 s")
        x = nn.functional.gelu(enc.conv1(input_features))
        # zero conv1 outputs past each clip's end, as conv2's own zero padding does for a clip encoded alone
        x = x * (torch.arange(length)[None, :] < lens[:, None]).to(x.dtype)[:, None, :]
        x = nn.functional.gelu(enc.conv2(x)).transpose(1, 2)
        x = x + enc.embed_positions.weight[:t_max]
        valid = torch.arange(t_max)[None, :] < t_enc[:, None]                    # [N, T]
        bias = torch.zeros(n, 1, 1, t_max, dtype=x.dtype)
        bias[~valid[:, None, None, :]] = torch.finfo(x.dtype).min
        ids = constant_modality_ids((n, t_max), Modality.AUDIO, valid.long())
        with modality_context(ids):
            for layer in enc.layers:
                x = layer(x, bias if n > 1 and not bool(valid.all()) else None)
        x = enc.layer_norm(x)
        return [x[i, : int(t_enc[i])] for i in range(n)]

    def project_images(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.image_projector(pooled)

    def project_audio(self, frames: list[torch.Tensor]) -> list[torch.Tensor]:
        k = self.omni_config.audio_stack
        return [self.audio_projector(stack_frames(f, k)) for f in frames]

    # -- embedding ---------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def residual_stream_writers(self) -> tuple[list[nn.Embedding], list[str]]:
        """What writes rows into the decoder's residual stream besides its own embedding table (for a
        rotation of the stream, ``x -> x Q``, which must rotate these too): the extra embedding table (OmniMini's
        marker ids) and the names of the projector output linears (image and audio tokens)."""
        return [self.extra_embeddings], ["image_projector.fc2", "audio_projector.fc2"]

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              input_features: torch.Tensor | None = None, feature_attention_mask: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None,
              audio_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Decoder input embeddings: text ids through the decoder's table, OmniMini ids through
        ``extra_embeddings``, placeholder rows replaced in order by the projected image / audio tokens.

        ``image_features`` / ``audio_features`` are tower outputs computed beforehand (``encode_images`` /
        ``encode_audio``); they replace ``pixel_values`` / ``input_features`` (used for training on cached
        features)."""
        cfg = self.omni_config
        v = cfg.vocab_size
        table = self.language_model.get_input_embeddings()
        own = input_ids >= v
        embeds = table(input_ids.clamp(max=v - 1))
        if bool(own.any()):
            extra = self.extra_embeddings((input_ids - v).clamp(min=0, max=len(EXTRA_TOKENS) - 1))
            embeds = torch.where(own[..., None], extra.to(embeds.dtype), embeds)
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        if audio_features is None and input_features is not None:
            audio_features = self.encode_audio(input_features, feature_attention_mask)
        embeds = self._scatter(embeds, input_ids, cfg.image_token_id, "image",
                               None if image_features is None else self.project_images(image_features).flatten(0, 1))
        audio = None if audio_features is None else self.project_audio(list(audio_features))
        embeds = self._scatter(embeds, input_ids, cfg.audio_token_id, "audio",
                               None if audio is None else torch.cat(audio))
        return embeds

    @staticmethod
    def _scatter(embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, what: str,
                 rows: torch.Tensor | None) -> torch.Tensor:
        mask = input_ids == token_id
        n = int(mask.sum())
        have = 0 if rows is None else rows.shape[0]
        if n != have:
            raise OmniMiniError(f"the text has {n} {what} placeholder tokens but the {what} inputs give {have} "
                                f"{what} tokens; build inputs with OmniMiniProcessor so that the counts match")
        if n == 0:
            return embeds
        out = embeds.clone()
        out[mask] = rows.to(embeds.dtype)
        return out

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, input_features: torch.Tensor | None = None,
                feature_attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache=None, use_cache: bool = False, inputs_embeds: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, audio_features: list[torch.Tensor] | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        """Decoder forward over text + placeholders (logits over the decoder vocabulary).

        ``cache`` (transformers 5.x name; ``past_key_values`` is accepted too) continues a decoding: then
        ``input_ids`` holds only the new tokens and ``attention_mask`` covers cache + new tokens."""
        cache = kwargs.pop("past_key_values", cache)
        if inputs_embeds is None:
            if input_ids is None:
                raise OmniMiniError("pass input_ids (or inputs_embeds)")
            inputs_embeds = self.embed(input_ids, pixel_values, input_features, feature_attention_mask,
                                       image_features, audio_features)
        new_mask = None if attention_mask is None else attention_mask[:, -inputs_embeds.shape[1]:]
        ids = (decoder_token_ids({"input_ids": input_ids, "attention_mask": new_mask},
                                 token_modality(self.omni_config)) if input_ids is not None
               else constant_modality_ids(tuple(inputs_embeds.shape[:-1]), Modality.TEXT))
        with modality_context(ids):
            return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                       labels=labels, cache=cache, use_cache=use_cache,
                                       logits_to_keep=logits_to_keep, **kwargs)


TRAINED_PREFIXES = ("image_projector", "audio_projector", "extra_embeddings")


def projector_digest(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of OmniMini's trained weights (the :data:`TRAINED_PREFIXES` parameters:
    names, shapes, dtypes and bytes). Identifies which projectors a result was measured with, so results of
    different trainings are never mixed (``compare`` reuses a finished row only for the same digest)."""
    import hashlib
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if name.split(".")[0] in TRAINED_PREFIXES:
            t = p.detach().cpu().contiguous()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def lin_std(lin: nn.Linear) -> float:
    return 1.0 / math.sqrt(lin.in_features)


def token_modality(config: OmniMiniConfig) -> dict[int, Modality]:
    return {config.image_token_id: Modality.IMAGE, config.audio_token_id: Modality.AUDIO}


# --------------------------------------------------------------------------------------------- weights


def save_projectors(model: OmniMiniForConditionalGeneration, path: str | Path, *, fp16: bool = True,
                    metadata: dict | None = None) -> Path:
    """The trained weights (fp16 by default) and the config to one safetensors file, atomically."""
    from safetensors.torch import save

    from morphoquant.utils.atomic import atomic_write_bytes

    tensors = {k: (v.half() if fp16 else v).contiguous() for k, v in sorted(model.trained_state_dict().items())}
    meta = {"omnimini_config": model.omni_config.to_json()}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    return atomic_write_bytes(Path(path), save(tensors, metadata=meta))


def load_projectors(path: str | Path) -> tuple[dict[str, torch.Tensor], OmniMiniConfig]:
    """``(fp32 tensors, config)`` from a file written by :func:`save_projectors`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise OmniMiniError(f"OmniMini projector file {path} does not exist; train it with "
                            "scripts/train_omnimini.py or reinstall morphoquant (it ships the trained file)")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k).float() for k in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
    if "omnimini_config" not in meta:
        raise OmniMiniError(f"{path} has no omnimini_config metadata; it was not written by save_projectors")
    return tensors, OmniMiniConfig.from_json(meta["omnimini_config"])


# --------------------------------------------------------------------------------------------- processor


class OmniMiniProcessor:
    """Turns text with ``<image>`` / ``<audio>`` markers plus images and waveforms into model inputs.

    Each ``<image>`` becomes ``<|image_start|> <|image_pad|> x 16 <|image_end|>``; each ``<audio>`` becomes
    ``<|audio_start|> <|audio_pad|> x n <|audio_end|>`` with ``n = ceil(ceil(L_mel / 2) / 4)``. Images are
    resized (bicubic) to ``image_size`` square and normalised with the ImageNet mean/std; waveforms (16 kHz
    mono float) become 80-bin Whisper log-mels of their own length.
    """

    IMAGE = "<image>"
    AUDIO = "<audio>"

    def __init__(self, tokenizer, config: OmniMiniConfig, feature_extractor=None):
        self.tokenizer = tokenizer
        self.config = config
        if feature_extractor is None:
            from transformers import WhisperFeatureExtractor
            feature_extractor = WhisperFeatureExtractor(feature_size=80)
        self.feature_extractor = feature_extractor

    def pixel_values(self, images) -> torch.Tensor:
        from PIL import Image
        s = self.config.image_size
        out = []
        for img in images:
            if not isinstance(img, Image.Image):
                img = Image.fromarray(np.asarray(img))
            a = np.asarray(img.convert("RGB").resize((s, s), Image.BICUBIC), dtype=np.float32) / 255.0
            a = (a - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
            out.append(torch.from_numpy(a.transpose(2, 0, 1).copy()))
        return torch.stack(out)

    def log_mels(self, waveform: np.ndarray) -> torch.Tensor:
        """``[80, L]`` log-mels of one 16 kHz clip, ``L = len // 160`` (no padding to 30 s)."""
        wave = np.asarray(waveform, dtype=np.float32)
        if wave.ndim != 1 or wave.size < 400:
            raise OmniMiniError(f"audio must be a mono 16 kHz waveform of at least 400 samples, got shape "
                                f"{wave.shape}")
        if wave.size > 30 * 16000:
            raise OmniMiniError(f"audio of {wave.size / 16000:.1f} s is longer than 30 s; cut it into clips")
        feats = self.feature_extractor(wave, sampling_rate=16000, padding=False, return_tensors="pt")
        return feats.input_features[0].float()

    def text_ids(self, text: str, n_audio: list[int]) -> list[int]:
        cfg = self.config
        ids: list[int] = []
        audio_i = 0
        parts = text.replace(self.AUDIO, "\x00A\x00").replace(self.IMAGE, "\x00I\x00").split("\x00")
        for part in parts:
            if part == "I":
                ids += [cfg.image_start_id] + [cfg.image_token_id] * cfg.image_tokens + [cfg.image_end_id]
            elif part == "A":
                ids += [cfg.audio_start_id] + [cfg.audio_token_id] * n_audio[audio_i] + [cfg.audio_end_id]
                audio_i += 1
            elif part:
                ids += self.tokenizer(part, add_special_tokens=False).input_ids
        return ids

    def __call__(self, text: str, images=None, audios=None) -> dict:
        """One sample (batch of 1): ``input_ids``, ``attention_mask`` and, when given, ``pixel_values`` /
        ``input_features`` + ``feature_attention_mask``."""
        images = list(images or [])
        audios = list(audios or [])
        n_img, n_aud = text.count(self.IMAGE), text.count(self.AUDIO)
        if n_img != len(images) or n_aud != len(audios):
            raise OmniMiniError(f"the text has {n_img} {self.IMAGE} and {n_aud} {self.AUDIO} markers but "
                                f"{len(images)} images and {len(audios)} audio clips were given")
        mels = [self.log_mels(a) for a in audios]
        ids = self.text_ids(text, [self.config.audio_tokens(m.shape[-1]) for m in mels])
        sample = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if images:
            sample["pixel_values"] = self.pixel_values(images)
        if mels:
            length = max(m.shape[-1] for m in mels)
            feats = torch.zeros(len(mels), mels[0].shape[0], length)
            mask = torch.zeros(len(mels), length, dtype=torch.long)
            for i, m in enumerate(mels):
                feats[i, :, : m.shape[-1]] = m
                mask[i, : m.shape[-1]] = 1
            sample["input_features"], sample["feature_attention_mask"] = feats, mask
        return sample

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids if int(i) < self.config.vocab_size],
                                     skip_special_tokens=True)


# --------------------------------------------------------------------------------------------- adapter


def _vision_ids(sample: Sample, hidden_shape) -> torch.Tensor:
    px = sample.get("pixel_values")
    expected = None if px is None else int(px.shape[0]) * (1 + (int(px.shape[-1]) // 14) ** 2)
    return tower_ids(hidden_shape, Modality.IMAGE, expected, "vision")


def _audio_ids(sample: Sample, hidden_shape) -> torch.Tensor:
    """``[N, T_max]`` rows of the packed clips; frames past a clip's own length are ``PAD``."""
    feats = sample.get("input_features")
    if feats is None:
        return tower_ids(hidden_shape, Modality.AUDIO, None, "audio")
    n, length = feats.shape[0], feats.shape[-1]
    mask = sample.get("feature_attention_mask")
    lens = mask.sum(-1).long() if mask is not None else torch.full((n,), length, dtype=torch.long)
    t_max = (length + 1) // 2
    valid = (torch.arange(t_max)[None, :] < ((lens + 1) // 2)[:, None]).long()
    ids = constant_modality_ids((n, t_max), Modality.AUDIO, valid)
    return check_rows(ids, hidden_shape, "audio")


class OmniMiniAdapter(ModelAdapter):
    """OmniMini: ``vision`` (DINOv2-S), ``audio`` (Whisper encoder) towers, off by default, and ``text``
    (SmolLM2 decoder, per-token image/audio/text ids)."""

    name = "omnimini"
    architectures = ("OmniMiniForConditionalGeneration",)
    model_types = ()

    def __init__(self, model):
        super().__init__(model)
        self.token_modality = token_modality(model.omni_config)

    def _build_stacks(self) -> list[BlockStack]:
        m = self.model
        fwd = make_forward(m)
        _, vblocks = block_list(m.vision_tower.encoder, ("layer", "layers"))
        _, ablocks = block_list(m.audio_tower, ("layers",))
        _, tblocks = block_list(m.language_model.model, ("layers",))
        return [
            AdapterStack(
                name="vision", blocks=list(vblocks), forward=fwd, modality_ids=_vision_ids,
                default_enabled=False,
                sequential_groups=resolve_groups(vblocks[0], DINOV2_GROUPS, stack_name="vision"),
                modality=Modality.IMAGE, row_layout="[N_images, 1 + patches, H]; CLS first; no padding",
                uses_sample=lambda s: s.get("pixel_values") is not None),
            AdapterStack(
                name="audio", blocks=list(ablocks), forward=fwd, modality_ids=_audio_ids,
                default_enabled=False,
                sequential_groups=resolve_groups(ablocks[0], AUDIO_GROUPS, stack_name="audio"),
                modality=Modality.AUDIO,
                row_layout="[N_clips, T_max, H]: post-conv frames of each clip; frames past its length PAD",
                uses_sample=lambda s: s.get("input_features") is not None),
            AdapterStack(
                name="text", blocks=list(tblocks), forward=fwd,
                modality_ids=lambda s, h: decoder_token_ids(s, self.token_modality, h, "text"),
                default_enabled=True,
                sequential_groups=resolve_groups(tblocks[0], DECODER_GROUPS, stack_name="text"),
                modality=None,
                row_layout="[B, T, H] decoder tokens; placeholder tokens carry image/audio embeddings",
                uses_sample=lambda s: True),
        ]

    def decoder_modality_ids(self, sample: Sample) -> torch.Tensor:
        return decoder_token_ids(sample, self.token_modality)

    def protected_module_names(self) -> list[str]:
        return protected_outside(self.model, self.stacks())


__all__ = [
    "ASSET_DIR", "EXTRA_TOKENS", "PROJECTOR_FILE", "OmniMiniAdapter", "OmniMiniConfig", "OmniMiniError",
    "OmniMiniForConditionalGeneration", "OmniMiniProcessor", "Projector", "load_projectors", "pool_patches",
    "save_projectors", "stack_frames", "token_modality",
]

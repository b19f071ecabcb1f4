"""Tiny random models (built from configs, no hub) and matching sample factories, for tests everywhere.

>>> model, make_sample = tiny_model("qwen2.5-omni-thinker")
>>> sample = make_sample()                       # batch 2: text + image + audio, row 1 right-padded
>>> sample = make_sample(video=True, image=False, seed=3)
>>> out = model(**sample)

Every model is fp32, in eval mode, < 1 M parameters (the full ``qwen2.5-omni``, an extra, is ~1.1 M with
its talker and token2wav), and runs a forward in a few to a few tens of milliseconds on a CPU. Models and
samples are deterministic in ``seed`` and do not touch the global RNG. Samples are dicts of model keyword
arguments; padded rows have ``attention_mask`` zeros *at the end* (right padding), odd rows being shorter.

Token ids of the multimodal models (Appendix F of docs/offline-assets.md): vocabulary 1024,
``IMAGE_TOKEN=1000``, ``VIDEO_TOKEN=1001``, ``AUDIO_TOKEN=1002``, vision start/end 1003/1004, audio start/end
1005/1006, text tokens in ``[10, 1000)``, pad id 0.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

TINY_ARCHS = ("llama", "qwen2", "qwen2.5-omni-thinker", "qwen2.5-vl", "whisper", "dinov2")
EXTRA_ARCHS = ("qwen2.5-omni",)  # full Omni model: thinker + talker + token2wav

VOCAB = 1024
IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN = 1000, 1001, 1002
VISION_START, VISION_END, AUDIO_START, AUDIO_END = 1003, 1004, 1005, 1006
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = 0, 1, 2
TEXT_LOW, TEXT_HIGH = 10, 1000

# Qwen2.5 vision geometry: patch 14, temporal patch 2, merge 2 -> one image of grid [1, 8, 8] = 64 patch
# rows (pixel rows of 3*2*14*14 = 1176 values) = 16 merged placeholder tokens; video grid [2, 4, 4] = 32 rows
# = 8 tokens.
PATCH_DIM = 3 * 2 * 14 * 14
IMAGE_GRID = (1, 8, 8)
VIDEO_GRID = (2, 4, 4)
# Qwen2.5-Omni audio: 128 mel bins; L frames -> ((L-1)//2+1-2)//2+1 tokens (200 -> 50, 160 -> 40).
N_MELS_OMNI = 128
AUDIO_FRAMES = 200
AUDIO_FRAMES_SHORT = 160

Sample = dict[str, torch.Tensor]
SampleFactory = Callable[..., Sample]


def audio_tokens(frames: int) -> int:
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def merged_tokens(grid: tuple[int, int, int], merge: int = 2) -> int:
    t, h, w = grid
    return t * h * w // (merge * merge)


# ------------------------------------------------------------------------------------------------ configs


def _omni_thinker_config():
    from transformers import Qwen2_5OmniThinkerConfig

    h = 128
    text = {"vocab_size": VOCAB, "hidden_size": h, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}}
    vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": h,
              "fullatt_block_indexes": [1]}
    audio = {"num_mel_bins": N_MELS_OMNI, "encoder_layers": 2, "encoder_attention_heads": 2,
             "encoder_ffn_dim": 128, "d_model": 64, "output_dim": h, "n_window": 100,
             "max_source_positions": 1500}
    return Qwen2_5OmniThinkerConfig(
        text_config=text, vision_config=vision, audio_config=audio,
        image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN, audio_token_index=AUDIO_TOKEN,
        audio_start_token_id=AUDIO_START, audio_end_token_id=AUDIO_END,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)


def _omni_full_config():
    from transformers import Qwen2_5OmniConfig

    talker = {"vocab_size": VOCAB, "embedding_size": 128, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
              "audio_token_index": AUDIO_TOKEN, "image_token_index": IMAGE_TOKEN,
              "video_token_index": VIDEO_TOKEN,
              "vision_start_token_id": VISION_START, "vision_end_token_id": VISION_END,
              "audio_start_token_id": AUDIO_START, "audio_end_token_id": AUDIO_END,
              "tts_text_start_token_id": 1010, "tts_text_end_token_id": 1011, "tts_text_pad_token_id": 1012,
              "tts_codec_start_token_id": 1013, "tts_codec_end_token_id": 1014,
              "tts_codec_pad_token_id": 1015, "tts_codec_mask_token_id": 1016}
    dit = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 16, "emb_dim": 16,
           "enc_emb_dim": 16, "enc_dim": 16, "enc_channels": [16, 16, 16, 16, 48],
           "enc_attention_channels": 8, "enc_se_channels": 8, "num_embeds": 64, "mel_dim": 16,
           "look_ahead_layers": [0], "look_backward_layers": [0]}
    bigvgan = {"mel_dim": 16, "upsample_initial_channel": 16, "upsample_rates": [2, 2],
               "upsample_kernel_sizes": [4, 4]}
    return Qwen2_5OmniConfig(thinker_config=_omni_thinker_config().to_dict(), talker_config=talker,
                             token2wav_config={"dit_config": dit, "bigvgan_config": bigvgan},
                             enable_audio_output=True)


_DECODER_KW = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
               "pad_token_id": PAD_TOKEN, "bos_token_id": BOS_TOKEN, "eos_token_id": EOS_TOKEN}


def _build(arch: str) -> nn.Module:
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**_DECODER_KW))
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(**_DECODER_KW))
    if arch == "qwen2.5-omni-thinker":
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration

        return Qwen2_5OmniThinkerForConditionalGeneration(_omni_thinker_config())
    if arch == "qwen2.5-omni":
        from transformers import Qwen2_5OmniForConditionalGeneration

        return Qwen2_5OmniForConditionalGeneration(_omni_full_config())
    if arch == "qwen2.5-vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        text = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                "bos_token_id": BOS_TOKEN, "eos_token_id": EOS_TOKEN, "pad_token_id": PAD_TOKEN,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}}
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                  "out_hidden_size": 64, "fullatt_block_indexes": [1]}
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
            vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, bos_token_id=BOS_TOKEN,
            eos_token_id=EOS_TOKEN, pad_token_id=PAD_TOKEN))
    if arch == "whisper":
        from transformers import WhisperConfig, WhisperForConditionalGeneration

        return WhisperForConditionalGeneration(WhisperConfig(
            vocab_size=512, num_mel_bins=WHISPER_MELS, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_source_positions=WHISPER_POSITIONS, max_target_positions=32, pad_token_id=PAD_TOKEN,
            bos_token_id=BOS_TOKEN, eos_token_id=EOS_TOKEN, decoder_start_token_id=WHISPER_START,
            begin_suppress_tokens=None, suppress_tokens=None))
    if arch == "dinov2":
        from transformers import Dinov2Config, Dinov2Model

        return Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        mlp_ratio=2, patch_size=14, image_size=DINO_IMAGE))
    raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS + EXTRA_ARCHS}")


WHISPER_MELS = 16
WHISPER_POSITIONS = 16          # encoder rows; mel input is 2 * 16 = 32 frames
WHISPER_START = 3
DINO_IMAGE = 56                 # 4 x 4 patches of 14 -> 17 rows with CLS


# ------------------------------------------------------------------------------------------------ samples


def _text(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(TEXT_LOW, TEXT_HIGH, (n,), generator=gen).tolist()


def _pad_rows(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), PAD_TOKEN, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _short(i: int, pad: bool) -> bool:
    return pad and i % 2 == 1


def _causal_lm_sample(batch_size: int = 2, seed: int = 0, seq_len: int = 12, pad: bool = True) -> Sample:
    """``input_ids``/``attention_mask`` ``[B, seq_len]``; odd rows are 4 tokens shorter (right padding)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [[BOS_TOKEN] + _text(gen, seq_len - 1 - (4 if _short(i, pad) else 0)) for i in range(batch_size)]
    ids, mask = _pad_rows(rows)
    return {"input_ids": ids, "attention_mask": mask}


def _qwen_mm_sample(batch_size: int = 2, seed: int = 0, *, image: bool = True, video: bool = False,
                    audio: bool = False, pad: bool = True, allow_audio: bool = True) -> Sample:
    """Text + image / video / audio placeholders, one of each per row, expanded as the processor would."""
    if audio and not allow_audio:
        raise ValueError("this model has no audio tower")
    gen = torch.Generator().manual_seed(seed)
    rows, frames = [], []
    n_img, n_vid = merged_tokens(IMAGE_GRID), merged_tokens(VIDEO_GRID)
    for i in range(batch_size):
        short = _short(i, pad)
        r = [BOS_TOKEN] + _text(gen, 4)
        if image:
            r += [VISION_START] + [IMAGE_TOKEN] * n_img + [VISION_END] + _text(gen, 2)
        if video:
            r += [VISION_START] + [VIDEO_TOKEN] * n_vid + [VISION_END] + _text(gen, 2)
        if audio:
            f = AUDIO_FRAMES_SHORT if short else AUDIO_FRAMES
            frames.append(f)
            r += [AUDIO_START] + [AUDIO_TOKEN] * audio_tokens(f) + [AUDIO_END]
        r += _text(gen, 3 if short else 6)
        rows.append(r)
    ids, mask = _pad_rows(rows)
    sample: Sample = {"input_ids": ids, "attention_mask": mask}
    if image:
        rows_per_image = IMAGE_GRID[0] * IMAGE_GRID[1] * IMAGE_GRID[2]
        sample["pixel_values"] = torch.randn(batch_size * rows_per_image, PATCH_DIM, generator=gen)
        sample["image_grid_thw"] = torch.tensor([IMAGE_GRID] * batch_size, dtype=torch.long)
    if video:
        sample["pixel_values_videos"] = torch.randn(
            batch_size * VIDEO_GRID[0] * VIDEO_GRID[1] * VIDEO_GRID[2], PATCH_DIM, generator=gen)
        sample["video_grid_thw"] = torch.tensor([VIDEO_GRID] * batch_size, dtype=torch.long)
        sample["video_second_per_grid"] = torch.ones(batch_size)
    if audio:
        feats = torch.randn(batch_size, N_MELS_OMNI, AUDIO_FRAMES, generator=gen)
        fmask = torch.zeros(batch_size, AUDIO_FRAMES, dtype=torch.long)
        for i, f in enumerate(frames):
            fmask[i, :f] = 1
            feats[i, :, f:] = 0.0
        sample["input_features"] = feats
        sample["feature_attention_mask"] = fmask
    return sample


def _omni_sample(batch_size: int = 2, seed: int = 0, *, image: bool = True, audio: bool = True,
                 video: bool = False, pad: bool = True) -> Sample:
    """Qwen2.5-Omni thinker sample: text + image + audio by default (``video=True`` adds a video; odd rows
    also have 160 instead of 200 valid mel frames, padded in ``feature_attention_mask``)."""
    return _qwen_mm_sample(batch_size, seed, image=image, video=video, audio=audio, pad=pad)


def _vl_sample(batch_size: int = 2, seed: int = 0, *, image: bool = True, video: bool = False,
               pad: bool = True) -> Sample:
    """Qwen2.5-VL sample: text + image (``video=True`` adds a video)."""
    return _qwen_mm_sample(batch_size, seed, image=image, video=video, audio=False, pad=pad,
                           allow_audio=False)


def _whisper_sample(batch_size: int = 2, seed: int = 0, dec_len: int = 6, pad: bool = True) -> Sample:
    """``input_features [B, 16, 32]``; ``attention_mask [B, 32]`` frame mask (odd rows: 24 valid frames,
    i.e. 12 valid encoder rows); ``decoder_input_ids``/``decoder_attention_mask [B, dec_len]`` (odd rows 2
    shorter)."""
    gen = torch.Generator().manual_seed(seed)
    n_frames = 2 * WHISPER_POSITIONS
    feats = torch.randn(batch_size, WHISPER_MELS, n_frames, generator=gen)
    fmask = torch.ones(batch_size, n_frames, dtype=torch.long)
    rows = []
    for i in range(batch_size):
        short = _short(i, pad)
        if short:
            fmask[i, 24:] = 0
            feats[i, :, 24:] = 0.0
        rows.append([WHISPER_START] + torch.randint(10, 512, (dec_len - 1 - (2 if short else 0),),
                                                    generator=gen).tolist())
    dec, dmask = _pad_rows(rows)
    return {"input_features": feats, "attention_mask": fmask, "decoder_input_ids": dec,
            "decoder_attention_mask": dmask}


def _dinov2_sample(batch_size: int = 2, seed: int = 0, pad: bool = True) -> Sample:
    """``pixel_values [B, 3, 56, 56]`` (17 rows per image; images have no padding, ``pad`` is ignored)."""
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch_size, 3, DINO_IMAGE, DINO_IMAGE, generator=gen)}


_FACTORIES: dict[str, SampleFactory] = {
    "llama": _causal_lm_sample, "qwen2": _causal_lm_sample, "qwen2.5-omni-thinker": _omni_sample,
    "qwen2.5-omni": _omni_sample, "qwen2.5-vl": _vl_sample, "whisper": _whisper_sample,
    "dinov2": _dinov2_sample,
}


def sample_factory(arch: str) -> SampleFactory:
    """The sample factory of ``arch`` without building the model."""
    try:
        return _FACTORIES[arch]
    except KeyError:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS + EXTRA_ARCHS}") from None


def tiny_model(arch: str, seed: int = 0) -> tuple[nn.Module, SampleFactory]:
    """A tiny random fp32 eval-mode model of ``arch`` and its sample factory.

    The factory is ``(batch_size=2, seed=0, **options) -> sample``. ``arch`` is one of :data:`TINY_ARCHS` (or
    ``"qwen2.5-omni"``, the full model with talker and token2wav). The weights depend only on ``seed``; the
    global RNG state is left as it was.
    """
    factory = sample_factory(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(arch)
    model = model.float().eval()
    return model, factory


class CharTokenizer:
    """Byte-level stand-in for a text tokenizer (no files): one id per character, ``ord(c) % 120 + 1``; id 0
    is the end token. Enough for the OmniMini processor and task."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        from types import SimpleNamespace
        return SimpleNamespace(input_ids=[ord(c) % 120 + 1 for c in text])

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 1) if 32 <= i - 1 < 121 else "?" for i in ids)

    def convert_tokens_to_ids(self, token):
        return 0


OMNIMINI_VOCAB = 128


def tiny_omnimini(layers: int = 2, tower_layers: int = 1, tie_word_embeddings: bool = False, seed: int = 0):
    """A tiny random OmniMini (Llama decoder of width 64, DINOv2 and Whisper-encoder towers of width 32, 56-pixel
    images: 4 image tokens) and its processor with a :class:`CharTokenizer`; vocabulary
    :data:`OMNIMINI_VOCAB`. Deterministic in ``seed``; the global RNG state is left as it was."""
    from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from .omnimini import OmniMiniConfig, OmniMiniForConditionalGeneration, OmniMiniProcessor
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=OMNIMINI_VOCAB, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                          tie_word_embeddings=tie_word_embeddings, max_position_embeddings=512))
        vision = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=tower_layers, num_attention_heads=2,
                                          intermediate_size=64, patch_size=14, image_size=56))
        audio = WhisperEncoder(WhisperConfig(d_model=32, encoder_layers=tower_layers, encoder_attention_heads=2,
                                             encoder_ffn_dim=64, num_mel_bins=80, max_source_positions=1500))
        cfg = OmniMiniConfig(vocab_size=OMNIMINI_VOCAB, text_hidden=64, image_hidden=32, audio_hidden=32,
                             image_size=56, image_projector_hidden=48, audio_projector_hidden=48)
        model = OmniMiniForConditionalGeneration.from_parts(lm.eval(), vision.eval(), audio.eval(), config=cfg)
    return model.float().eval(), OmniMiniProcessor(CharTokenizer(), cfg)


__all__ = [
    "AUDIO_TOKEN", "EXTRA_ARCHS", "IMAGE_TOKEN", "OMNIMINI_VOCAB", "PAD_TOKEN", "TINY_ARCHS", "VIDEO_TOKEN",
    "CharTokenizer", "audio_tokens", "sample_factory", "tiny_model", "tiny_omnimini",
]

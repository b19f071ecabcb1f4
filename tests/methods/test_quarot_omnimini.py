"""QuaRot-style rotation of OmniMini: the extra embedding table and both projector outputs write into the
rotated stream, so the FP logits of a sequence with image, audio and text tokens are unchanged (tiny parts)."""
import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from morphoquant.methods.quarot import HadamardLinear, rotate_model
from morphoquant.models import get_adapter
from morphoquant.models.omnimini import OmniMiniConfig, OmniMiniForConditionalGeneration, OmniMiniProcessor


class _Tok:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        from types import SimpleNamespace
        return SimpleNamespace(input_ids=[ord(c) % 120 + 1 for c in text])


def test_rotation_of_omnimini_leaves_the_fp_logits_unchanged(perturb_norms):
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      max_position_embeddings=512)).eval()
    vision = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, patch_size=14, image_size=56)).eval()
    audio = WhisperEncoder(WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2,
                                         encoder_ffn_dim=64, num_mel_bins=80, max_source_positions=1500)).eval()
    cfg = OmniMiniConfig(vocab_size=128, text_hidden=64, image_hidden=32, audio_hidden=32, image_size=56,
                         image_projector_hidden=48, audio_projector_hidden=48)
    model = OmniMiniForConditionalGeneration.from_parts(lm, vision, audio, config=cfg)
    perturb_norms(model)
    proc = OmniMiniProcessor(_Tok(), cfg)
    wave = (np.random.default_rng(0).standard_normal(8000) * 0.1).astype(np.float32)
    s = proc("<image>Q:<audio>A: yes", images=[np.zeros((64, 64, 3), np.uint8)], audios=[wave])
    with torch.no_grad():
        before = model(**s).logits
    info = rotate_model(model, get_adapter(model).stacks(), seed=1)
    with torch.no_grad():
        after = model(**s).logits
    assert info["towers"] == ["image_projector.fc2", "audio_projector.fc2"]
    assert isinstance(model.language_model.model.layers[0].mlp.down_proj, HadamardLinear)
    scale = float(before.abs().max())
    assert torch.allclose(after, before, atol=2e-5 * scale, rtol=1e-4)

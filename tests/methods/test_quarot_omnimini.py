"""QuaRot-style rotation of OmniMini: the extra embedding table and both projector outputs write into the
rotated stream, so the FP logits of a sequence with image, audio and text tokens are unchanged (tiny parts)."""
import numpy as np
import torch

from morphoquant.methods.quarot import HadamardLinear, rotate_model
from morphoquant.models import get_adapter
from morphoquant.models.tiny import tiny_omnimini


def test_rotation_of_omnimini_leaves_the_fp_logits_unchanged(perturb_norms):
    model, proc = tiny_omnimini(layers=2, tie_word_embeddings=True)
    perturb_norms(model)
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

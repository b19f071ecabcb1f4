"""Fixtures for the checkpoint tests: tiny models quantized by hand (fast, every scheme), saved once per scheme."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

try:
    import morphoquant  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from export_helpers import hand_quantize


@pytest.fixture(scope="session")
def quantized_llama():
    """``quantized_llama(scheme, **tiny_kwargs) -> (model, sample_factory)``: a fresh tiny llama quantized by hand."""
    from morphoquant.models.tiny import tiny_model

    def make(scheme: str, seed: int = 0):
        model, factory = tiny_model("llama", seed=seed)
        return hand_quantize(model, scheme, seed), factory
    return make


@pytest.fixture(scope="session")
def saved_dir(tmp_path_factory, quantized_llama):
    """``saved_dir(scheme) -> (path, model, factory)``, saved once per scheme; tests must copy before editing."""
    from morphoquant.export import save_quantized

    cache: dict = {}

    def get(scheme: str):
        if scheme not in cache:
            model, factory = quantized_llama(scheme)
            path = tmp_path_factory.mktemp(f"ckpt-{scheme}") / "model"
            save_quantized(model, path, recipe="rtn-w4a4", calibration_manifest={"source": "random", "n": 2},
                           extra={"scheme": scheme}, verbose=False)
            cache[scheme] = (path, model, factory)
        return cache[scheme]
    return get

"""Shared fixtures for the model-adapter tests (tiny random models are built once per session)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

try:  # the package may not be installed in the venv: fall back to the src layout
    import morphoquant.models  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

_CACHE: dict = {}


@pytest.fixture(scope="session")
def tiny():
    """``tiny(arch) -> (model, sample_factory)``, cached; tests must not modify the models."""
    from morphoquant.models.tiny import tiny_model

    def get(arch: str):
        if arch not in _CACHE:
            _CACHE[arch] = tiny_model(arch)
        return _CACHE[arch]

    return get

"""Deployable checkpoints: packed int4/int8 weights in the compressed-tensors layout plus a MorphoQuant extension.

>>> report = save_quantized(model, "out/smollm2-w4a4", recipe, calibration_manifest)   # doctest: +SKIP
>>> model = load_quantized("out/smollm2-w4a4")          # also morphoquant.load          # doctest: +SKIP

See ``docs/serving.md`` for the layout and what vLLM can serve.
"""
from .errors import (
                     ArchitectureMismatchError,
                     CheckpointError,
                     ConfigMismatchError,
                     CorruptCheckpointError,
                     IncompatibleCheckpointError,
                     MissingTensorError,
                     NotAMorphoQuantCheckpointError,
                     UnconsumedTensorError,
                     UnsupportedExportError,
)
from .load import load_quantized, verify_checkpoint
from .manifest import FORMAT_VERSION, MANIFEST_NAME, read_manifest
from .save import SaveReport, save_quantized

load = load_quantized

__all__ = [
                     "FORMAT_VERSION",
                     "MANIFEST_NAME",
                     "ArchitectureMismatchError",
                     "CheckpointError",
                     "ConfigMismatchError",
                     "CorruptCheckpointError",
                     "IncompatibleCheckpointError",
                     "MissingTensorError",
                     "NotAMorphoQuantCheckpointError",
                     "SaveReport",
                     "UnconsumedTensorError",
                     "UnsupportedExportError",
                     "load",
                     "load_quantized",
                     "read_manifest",
                     "save_quantized",
                     "verify_checkpoint",
]

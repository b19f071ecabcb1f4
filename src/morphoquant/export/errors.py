"""Errors of the checkpoint reader and writer. Every problem with a checkpoint directory raises a subclass of
:class:`CheckpointError` (itself a ``ValueError``), with a message that names the file, tensor or module."""
from __future__ import annotations

__all__ = ["ArchitectureMismatchError", "CheckpointError", "ConfigMismatchError", "CorruptCheckpointError",
           "IncompatibleCheckpointError", "MissingTensorError", "NotAMorphoQuantCheckpointError",
           "UnconsumedTensorError"]


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded (base class of every loader error)."""


class NotAMorphoQuantCheckpointError(CheckpointError):
    """No ``morphoquant.json`` manifest: a directory from another tool, or an unfinished write."""


class CorruptCheckpointError(CheckpointError):
    """A file is truncated, tampered with or unparseable (size, sha256, header or manifest problems)."""


class IncompatibleCheckpointError(CheckpointError):
    """Written by an incompatible format version, or needs something this installation lacks."""


class ConfigMismatchError(CheckpointError):
    """``config.json`` (its ``quantization_config``) disagrees with the manifest or with the tensors."""


class ArchitectureMismatchError(CheckpointError):
    """The target model is not the architecture the checkpoint was written from (class, module names,
    or shapes differ)."""


class MissingTensorError(CheckpointError):
    """A tensor the manifest or a module needs is absent."""


class UnconsumedTensorError(CheckpointError):
    """Tensors were written but the model has no slot for them (they would be silently dropped)."""


class UnsupportedExportError(ValueError):
    """The quantized model has a structure the checkpoint format cannot describe (so it would not reload as
    evaluated); nothing is written."""

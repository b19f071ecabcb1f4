"""The data-level error type of :mod:`morphoquant.data`."""

from __future__ import annotations

__all__ = ["DataError", "MissingToolError"]


class DataError(ValueError):
    """A data set or file is missing, corrupt or unusable; the message names the problem and the fix."""


class MissingToolError(DataError):
    """An external program a data loader needs (e.g. ``espeak-ng``) is not installed."""

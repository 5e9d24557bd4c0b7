"""The errors a checkpoint raises. All are ``CheckpointError``, a ``ValueError``: each names the key or file
and says what to do."""

from __future__ import annotations

__all__ = [
    "CheckpointError", "CheckpointKeyError", "CheckpointMismatchError", "CheckpointCorruptError",
    "CheckpointVersionError", "CheckpointSaveError",
]


class CheckpointError(ValueError):
    """Base of every checkpoint error."""


class CheckpointKeyError(CheckpointError):
    """The state to load has keys the checkpoint lacks (``missing``) or the other way round (``unexpected``)."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str]):
        super().__init__(message)
        self.missing, self.unexpected = missing, unexpected


class CheckpointMismatchError(CheckpointError):
    """A tensor's global shape or dtype differs between the checkpoint and the state to load into."""


class CheckpointCorruptError(CheckpointError):
    """A file is missing, truncated, or its checksum differs from the index; or the index is malformed or unsafe."""


class CheckpointVersionError(CheckpointError):
    """The index was written by a newer format version than this dtensor_plus reads."""


class CheckpointSaveError(CheckpointError):
    """A save failed on some rank; nothing was published and the previous checkpoint is untouched."""

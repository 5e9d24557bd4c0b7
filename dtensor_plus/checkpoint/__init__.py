"""Sharded checkpoints with resharding: every rank writes only its own shards, any layout loads into any other.

    from dtensor_plus import checkpoint

    state = checkpoint.get_state_dict(model, optimizer)   # {"model": ..., "optimizer": ...}, DTensors inside
    state["step"] = step
    checkpoint.save(state, "ckpt/latest")                # collective; atomic: a crash leaves the old one
    ...
    checkpoint.load(state, "ckpt/latest")                # in place, into whatever layout state now has
    checkpoint.set_state_dict(model, optimizer, state)

Every rank passes its own part of the state: DTensors in any layout on any mesh (a Partial one is reduced
first), plain tensors (saved once; every rank holding one must hold the same value, so pipeline stages and
expert-parallel ranks may each hold their own keys), and JSON values (step counts, hyperparameters, losses).
A DTensor may live on a sub-mesh (``mesh["tp"]`` of a (dp, tp) mesh): each distinct block is written once.
A checkpoint is a directory: one safetensors file per writing rank, ``index.json`` (index.py: global shapes,
dtypes, placements, meshes, each chunk's runs and crc32, the non-tensor values) and its sha256 beside it. No
pickle is written or read. A load believes nothing it has not checked (digest, coverage of every entry exactly
once, keys, dtypes, crc32s, paths inside the directory) and fails on every rank together. Files: save.py,
load.py (resharding reads), reader.py (checked chunk reads), digest.py (checksums), geometry.py (which entries
a block holds), atomic.py (temporary directory + rename), state_dict.py (model + optimizer), world.py
(metadata exchange), writer.py (safetensors files), errors.py.

``export_safetensors(model, "model.safetensors")`` (export.py) writes the whole weights as one file instead, as
Hugging Face's ``model.safetensors``: for the world outside, not for resuming.
"""

from .errors import (CheckpointCorruptError, CheckpointError, CheckpointKeyError, CheckpointMismatchError,
                     CheckpointSaveError, CheckpointVersionError)
from .export import export_safetensors
from .load import load
from .save import AsyncSave, save
from .state_dict import get_state_dict, set_state_dict

__all__ = [
    "save", "load", "AsyncSave", "export_safetensors", "get_state_dict", "set_state_dict",
    "CheckpointError", "CheckpointKeyError", "CheckpointMismatchError", "CheckpointCorruptError",
    "CheckpointVersionError", "CheckpointSaveError",
]

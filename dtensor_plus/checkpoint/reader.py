"""Reading saved chunks, each checked against its index entry before any of its values is used.

A chunk's file must be a bare name inside the checkpoint directory (symlinks resolved) of the size the index
says; in it, the chunk's key must exist with the index's dtype (never cast: a relabelled dtype would turn
bits into other numbers) and the shape of its runs; with ``verify`` its bytes must match its crc32, which
digest.py binds to its key, dtype and runs. Only then does a box of it reach the caller.
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open

from . import digest, geometry, index
from .errors import CheckpointCorruptError
from .writer import CODES

__all__ = ["ChunkReader"]


class ChunkReader:
    """The safetensors files of one checkpoint, opened lazily, each checked (inside the directory, size) once."""

    def __init__(self, directory: str, files: dict, verify: bool):
        self.directory, self.files, self.verify = directory, files, verify
        self.open: dict[str, object] = {}

    def read(self, entry: dict, chunk: dict, box: tuple) -> torch.Tensor:
        """The ``box`` (a slice per dim; () for a 0-d tensor) of ``chunk`` of the tensor ``entry``."""
        name = index.path_name(entry["path"])
        handle, file_path = self._handle(chunk["file"], name)
        where = f"{file_path}, chunk {chunk['key']} of tensor {name}"
        fix = "the file does not match its index: restore the checkpoint from a copy"
        try:
            sliced = handle.get_slice(chunk["key"])
        except Exception as error:  # noqa: BLE001 - safetensors raises its own types
            raise CheckpointCorruptError(f"{where}: the file has no such chunk ({error}); {fix}") from error
        code, want_code = sliced.get_dtype(), CODES[index.DTYPES[entry["dtype"]]]
        if code != want_code:
            raise CheckpointCorruptError(f"{where}: the file holds dtype {code}, the index says {entry['dtype']} "
                                         f"({want_code}); values are never cast on load; {fix}")
        shape, want_shape = list(sliced.get_shape()), list(geometry.local_shape(chunk["runs"]))
        if shape != want_shape:
            raise CheckpointCorruptError(f"{where}: the file holds shape {shape}, the index's runs {want_shape}; {fix}")
        if not self.verify:
            return sliced[box] if box else handle.get_tensor(chunk["key"])
        values = handle.get_tensor(chunk["key"])  # NOTE: the whole chunk, once: its crc32 covers all of it
        crc = digest.tensor_crc32(values, digest.chunk_seed(chunk["key"], entry["dtype"], chunk["runs"]))
        if crc != chunk["crc32"]:
            raise CheckpointCorruptError(
                f"{where} (runs {chunk['runs']}): crc32 {crc} differs from the index's {chunk['crc32']}: the bytes are "
                f"damaged, or were moved or relabelled since save; {fix} (load(..., verify=False) skips this check: "
                f"not recommended)")
        return values[box] if box else values

    def _handle(self, name: str, tensor: str):
        if name not in self.open:
            file_path = index.safe_file_path(self.directory, name, os.path.join(self.directory, index.INDEX_NAME))
            where = f"{file_path} (holding tensor {tensor})"
            self._check_size(file_path, self.files[name]["bytes"], where)
            try:
                self.open[name] = safe_open(file_path, framework="pt"), file_path
            except Exception as error:  # noqa: BLE001
                raise CheckpointCorruptError(f"{where} is not a readable safetensors file ({error}); restore the "
                                             f"checkpoint from a copy") from error
        return self.open[name]

    @staticmethod
    def _check_size(file_path: str, size: int, where: str) -> None:
        if not os.path.isfile(file_path):
            raise CheckpointCorruptError(f"{where} is missing (the index lists it); restore the checkpoint from a copy")
        have = os.path.getsize(file_path)
        if have != size:
            raise CheckpointCorruptError(f"{where} has {have} bytes, its index says {size} (truncated or "
                                         f"overwritten); restore the checkpoint from a copy")

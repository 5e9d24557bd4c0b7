"""The checksums that make a load refuse an edited or damaged checkpoint instead of returning wrong data.

- Each chunk: a crc32 of its bytes, started from the crc32 of what the index says about the chunk (its key,
  dtype and runs) and stored in the index beside it. So bytes verify only at the place they were saved for:
  a chunk whose runs were moved, or another tensor's bytes under its key, fails like a flipped bit does.
- The index: a sha256 of ``index.json``'s exact bytes, in ``index.json.sha256`` beside it, in the format of
  ``sha256sum`` (``cd ckpt && sha256sum -c index.json.sha256`` checks it by hand). Any edit of the index that
  did not come from ``save`` fails before a byte of the index is believed.

crc32 for the chunks because zlib runs it at memory speed over gigabytes of tensors (and it catches every
burst error up to 32 bits); sha256 for the index, a few KiB, where speed does not matter.
"""

from __future__ import annotations

import hashlib
import json
import zlib

import torch

__all__ = ["chunk_seed", "tensor_crc32", "index_digest_line", "digest_of_line"]


def chunk_seed(key: str, dtype: str, runs) -> int:
    """The crc32 a chunk's digest starts from: its key, dtype and runs (tuples and lists alike) as JSON."""
    return zlib.crc32(json.dumps([key, dtype, runs], separators=(",", ":")).encode())


def tensor_crc32(t: torch.Tensor, seed: int) -> str:
    """crc32 (8 hex digits) of a contiguous CPU tensor's bytes, continued from ``seed``; as save's writer takes it."""
    if not t.numel():
        return f"{seed:08x}"
    data = t.reshape(-1).view(torch.uint8).numpy()  # the tensor's own memory: no copy
    return f"{zlib.crc32(data, seed):08x}"


def index_digest_line(data: bytes, name: str) -> str:
    """The line ``sha256sum`` prints for a file ``name`` holding ``data``."""
    return f"{hashlib.sha256(data).hexdigest()}  {name}\n"


def digest_of_line(line: str) -> str | None:
    """The hex digest a ``sha256sum`` line holds; None if it is not one."""
    digest = line.split(" ", 1)[0]
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return digest
    return None

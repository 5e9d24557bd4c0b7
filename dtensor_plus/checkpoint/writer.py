"""Writing one rank's shards as a safetensors file, streamed from the tensors' memory, crc32 taken on the way.

``safetensors.torch.save`` copies every tensor twice on its way to bytes (measured: 0.58 s for 64 MiB, more
than writing it); the format is simple enough to write directly: an 8-byte little-endian header length, a JSON
header ``{key: {"dtype", "shape", "data_offsets": [begin, end]}}`` padded with spaces to 8 bytes, then the
tensors' bytes back to back. Reading stays with the safetensors library (``safe_open``), which validates the
header; a test checks that ``safetensors.torch.load_file`` reads our files back equal.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib

import torch

__all__ = ["write_safetensors"]

# safetensors' dtype codes (its format spec)
_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_CODES.update({getattr(torch, n): c for n, c in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")) if hasattr(torch, n)})


def write_safetensors(file_path: str, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Write contiguous CPU ``tensors`` to ``file_path`` and flush to disk; returns (crc32, size in bytes)."""
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    header, offset = {}, 0
    for key, t in tensors.items():
        assert t.is_contiguous() and t.device.type == "cpu", key
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    prefix = struct.pack("<Q", len(head)) + head
    crc, size = zlib.crc32(prefix), len(prefix)
    with open(file_path, "wb") as f:
        f.write(prefix)
        for t in tensors.values():
            if t.numel():
                data = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own memory: no copy
                crc, size = zlib.crc32(data, crc), size + len(data)
                f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return crc, size

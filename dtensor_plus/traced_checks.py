"""Cross-rank checks inside a compiled graph.

Eager checks read values on the host (a digest of a plain tensor that joins DTensors, the block sizes from_local
guessed) and raise on every rank alike, naming the rank that differs. A trace has no values, so the same question
goes into the graph instead: each rank's row of integers is all-gathered (functional collectives, like every
collective under tracing) and ``torch._assert_async`` fails on every rank alike when the check fails, at run time,
before any value computed from the bad input is used. The message names the problem and the fix; the rank that
differs is not known to a graph.
"""

from __future__ import annotations

import zlib

import torch

from . import collectives

__all__ = ["assert_same_on_every_rank", "assert_true_on_every_rank", "digest"]


def assert_same_on_every_rank(row: torch.Tensor, mesh, message: str) -> None:
    """Fail on every rank of ``mesh`` unless ``row`` (1-d int64, one length everywhere) is the same on all."""
    everyone, _ = collectives.every_rank_rows(row, mesh)
    torch._assert_async((everyone == everyone[0]).all(), message)


def assert_true_on_every_rank(ok: bool, mesh, message: str) -> None:
    """Fail on every rank of ``mesh`` unless ``ok`` (known when tracing: metadata only) holds on all of them."""
    everyone, _ = collectives.every_rank_rows(torch.tensor([int(ok)], dtype=torch.int64), mesh)
    torch._assert_async(everyone.all(), message)


# Position weights of the value digest: a prime modulus keeps them small enough that the int64 sum cannot overflow
# for any tensor that fits in memory, and makes swapped elements change the digest.
_MODULUS = 65521


def digest(t: torch.Tensor) -> torch.Tensor:
    """Shape, dtype and exact bytes of ``t`` as three int64, computed by tensor ops (a trace cannot read bytes)."""
    header = zlib.crc32(f"{tuple(t.shape)} {t.dtype}".encode())
    data = t.detach().contiguous().reshape(-1)
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    bits = data.view(torch.uint8).to(torch.int64)
    weights = torch.arange(bits.numel(), dtype=torch.int64, device=bits.device) % _MODULUS + 1
    return torch.stack([torch.tensor(header, dtype=torch.int64, device=bits.device), (bits * weights).sum(), bits.sum()])

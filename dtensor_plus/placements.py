"""Placements: how one mesh dimension lays out a tensor. Small frozen value types that own their geometry.

A DTensor carries one placement per mesh dimension:

- ``Shard(dim)``: tensor dim ``dim`` is split across the mesh dim the way ``torch.chunk`` splits it: the
  leading ranks hold ``ceil(size / n)`` entries, trailing shards may be smaller or empty.
- ``Replicate()``: every rank holds the whole tensor.
- ``Partial(reduce_op)``: every rank holds a tensor of the full shape; the value is their reduction
  (``sum``, ``avg``, ``max``, ``min`` or ``product``; ``"prod"`` is read as ``"product"``).
- ``StridedShard(dim, outer)``: what a Shard becomes when a view merges it behind other dims. Flattening
  (B, H) with H sharded gives a (B*H) dim whose rank r holds the rows b*H + h for every b and its own h:
  the dim read as (outer, inner) with the inner factor split. Views, batched matmuls, permutes and
  elementwise ops keep it (the batched matmul of attention heads runs without gathering them); every other
  op sees it gathered first, and unflattening (B*H) back to (B, H) turns it into Shard(1) again.
- ``StridedShard(dim, outer, zigzag=True)``: the same reading, the inner factor cut into 2n torch.chunk
  pieces and rank r holding pieces r and 2n-1-r (in that order). Users place it (load-balanced causal
  context parallelism: ``StridedShard(seq_dim, 1, zigzag=True)`` is the zigzag of a sequence); views that
  merge the sequence behind the batch keep it, like any StridedShard. ``full_tensor()`` is the natural order.
"""

from __future__ import annotations

from types import MappingProxyType

from dataclasses import dataclass

import torch

__all__ = ["Placement", "Shard", "StridedShard", "Replicate", "Partial", "chunk_bounds"]

REDUCE_OPS = ("sum", "avg", "max", "min", "product")
_ALIASES = {"prod": "product"}  # torch.prod's name for it
_ALIASES = MappingProxyType(_ALIASES)  # read-only: a constant table


def chunk_bounds(size: int, num_chunks: int, index: int) -> tuple[int, int]:
    """(offset, length) of chunk ``index`` when ``size`` entries split like ``torch.chunk`` into ``num_chunks``."""
    chunk = -(-size // num_chunks)
    start = min(index * chunk, size)
    return start, min(start + chunk, size) - start


class Placement:
    """Base of the three placement kinds; the predicates let rules read placements without isinstance."""

    __slots__ = ()

    def is_shard(self, dim: int | None = None) -> bool:
        return False

    def is_replicate(self) -> bool:
        return False

    def is_partial(self) -> bool:
        return False

    def is_strided_shard(self) -> bool:
        return False

    def __fx_repr__(self) -> tuple[str, dict]:
        """How torch.compile writes this placement into a graph (tracing.py): its repr is its constructor call."""
        return repr(self), {type(self).__name__: type(self)}


@dataclass(frozen=True, slots=True)
class Shard(Placement):
    """Tensor dimension ``dim`` split across the mesh dimension (``torch.chunk`` sizes).

    A negative ``dim`` is normalised against the tensor's rank when the placement meets a tensor.
    """

    dim: int

    def __post_init__(self):
        if not isinstance(self.dim, int) or isinstance(self.dim, bool):
            raise TypeError(f"Shard(dim) needs an int tensor dimension, got {self.dim!r}")

    def is_shard(self, dim: int | None = None) -> bool:
        return dim is None or dim == self.dim

    def normalized(self, ndim: int) -> Shard:
        if not -ndim <= self.dim < max(ndim, 1):
            raise ValueError(
                f"Shard(dim={self.dim}) is out of range for a tensor with {ndim} dims; "
                f"use a dim in [{-ndim}, {ndim - 1}]"
            )
        return self if self.dim >= 0 else Shard(self.dim + ndim)

    def chunk(self, tensor: torch.Tensor, num_chunks: int, index: int) -> torch.Tensor:
        """This rank's piece of ``tensor`` (a view; empty where torch.chunk runs out of rows)."""
        offset, length = chunk_bounds(tensor.shape[self.dim], num_chunks, index)
        return tensor.narrow(self.dim, offset, length)

    def __repr__(self) -> str:
        return f"Shard(dim={self.dim})"


@dataclass(frozen=True, slots=True)
class Replicate(Placement):
    """Every rank of the mesh dimension holds the whole tensor."""

    def is_replicate(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "Replicate()"


@dataclass(frozen=True, slots=True)
class Partial(Placement):
    """Every rank holds a full-shape tensor; the value is their reduction by ``reduce_op``."""

    reduce_op: str = "sum"

    def __post_init__(self):
        reduce_op = _ALIASES.get(self.reduce_op, self.reduce_op) if isinstance(self.reduce_op, str) else self.reduce_op
        if reduce_op not in REDUCE_OPS:
            raise ValueError(f"Partial(reduce_op={self.reduce_op!r}) is unknown; use one of {REDUCE_OPS}")
        object.__setattr__(self, "reduce_op", reduce_op)  # frozen: Partial("prod") == Partial("product")

    def is_partial(self) -> bool:
        return True

    def partition(self, tensor: torch.Tensor, num_chunks: int, index: int) -> torch.Tensor:
        """A local value whose reduction over the mesh dimension is ``tensor`` (exact, no rounding): index 0 holds
        it and the others the identity of a sum (0) or a product (1)."""
        if index != 0 and self.reduce_op == "sum":
            return torch.zeros_like(tensor)
        if index != 0 and self.reduce_op == "product":
            return torch.ones_like(tensor)
        return tensor  # avg, max and min of equal values are that value

    def __repr__(self) -> str:
        return f"Partial(reduce_op={self.reduce_op!r})" if self.reduce_op != "sum" else "Partial()"


@dataclass(frozen=True, slots=True)
class StridedShard(Placement):
    """Tensor dim ``dim`` read as (``outer``, size // outer), its inner factor split (``torch.chunk`` sizes).

    Not a ``Shard``: each rank's rows are not one contiguous block, so ``is_shard()`` is False and only the
    rules that know this placement see it (the dispatcher gathers it for all others). Made by view rules,
    not by users. It may nest inside Shards of the same dim on earlier mesh dims (then ``outer`` counts the
    groups of the block they leave: (B, H) with B on dp and H on tp flattens to Shard(0) on dp and
    StridedShard(0, B // dp) on tp), and outside no other split except one more level of the same
    StridedShard (a dim split over several mesh dims, then folded: each level cuts the piece the level before
    it left).

    ``zigzag=True``: the inner factor is cut into 2n ``torch.chunk`` pieces (n ranks on the mesh dim) and
    rank r holds pieces r and 2n-1-r, so a causal mask gives every rank equal work. Users place this one::

        x = distribute_tensor(x_BTD, mesh, [StridedShard(1, 1, zigzag=True)])   # T zigzag over the mesh dim
    """

    dim: int
    outer: int
    zigzag: bool = False

    def __post_init__(self):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.dim, self.outer)):
            raise TypeError(f"StridedShard(dim={self.dim!r}, outer={self.outer!r}) needs int dim and outer")
        if self.dim < 0 or self.outer < 1:
            raise ValueError(f"StridedShard(dim={self.dim}, outer={self.outer}) needs dim >= 0 and outer >= 1")
        if not isinstance(self.zigzag, bool):
            raise TypeError(f"StridedShard(zigzag={self.zigzag!r}) takes a bool")

    def is_strided_shard(self) -> bool:
        return True

    def with_dim(self, dim: int, outer: int | None = None) -> StridedShard:
        """The same split (zigzag or not) on another dim or with another outer factor (what views make)."""
        return StridedShard(dim, self.outer if outer is None else outer, self.zigzag)

    def pieces(self, inner: int, num_chunks: int, index: int) -> list[tuple[int, int]]:
        """(offset, length) in the inner factor of the pieces rank ``index`` holds, in its local order."""
        if not self.zigzag:
            return [chunk_bounds(inner, num_chunks, index)]
        return [chunk_bounds(inner, 2 * num_chunks, index), chunk_bounds(inner, 2 * num_chunks, 2 * num_chunks - 1 - index)]

    def local_size(self, size: int, num_chunks: int, index: int) -> int:
        return self.outer * sum(length for _, length in self.pieces(size // self.outer, num_chunks, index))

    def chunk(self, tensor: torch.Tensor, num_chunks: int, index: int) -> torch.Tensor:
        """This rank's rows of ``tensor`` (a copy: they are not contiguous)."""
        size = tensor.shape[self.dim]
        split = tensor.unflatten(self.dim, (self.outer, size // self.outer))
        parts = [split.narrow(self.dim + 1, offset, length) for offset, length in self.pieces(size // self.outer, num_chunks, index)]
        return torch.cat(parts, self.dim + 1).flatten(self.dim, self.dim + 1)

    def __repr__(self) -> str:
        zigzag = ", zigzag=True" if self.zigzag else ""
        return f"StridedShard(dim={self.dim}, outer={self.outer}{zigzag})"

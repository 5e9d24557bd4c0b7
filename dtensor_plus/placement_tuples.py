"""Pure functions on placement tuples (one placement per mesh dim), shared by the core, the op rules and the
layouts, so that "every mesh dim Replicate" or "Partial reduced, Shards kept" is written once.

They import nothing but ``placements.py``: any module can use them without an import cycle.
"""

from __future__ import annotations

from typing import Iterable

from .placements import Placement, Replicate, Shard

__all__ = ["replicated", "without_partial", "unshard_dims"]


def replicated(mesh_ndim: int) -> tuple[Placement, ...]:
    """Replicate on each of ``mesh_ndim`` mesh dims: the whole tensor on every rank."""
    return (Replicate(),) * mesh_ndim


def without_partial(placements: Iterable[Placement]) -> tuple[Placement, ...]:
    """``placements`` with every Partial made Replicate (Shards kept): the same value with the pending reduction
    done. It is also where the gradient of a tensor laid out as ``placements`` lands: d(sum of pieces)/d(piece)
    is the whole output gradient on every rank, so a Partial input takes a Replicate gradient."""
    return tuple(Replicate() if p.is_partial() else p for p in placements)


def unshard_dims(placements: Iterable[Placement], dims) -> tuple[Placement, ...]:
    """``placements`` with every Shard of a tensor dim in ``dims`` (and every Partial) made Replicate."""
    return tuple(Replicate() if p.is_partial() or (isinstance(p, Shard) and p.dim in dims) else p for p in placements)

"""Hypothesis strategies for meshes, layouts valid for a shape, and the data to build DTensors in ranks.

Strategies run in the pytest process and produce plain data (shapes, mesh shapes, placements, seeds); the
rank function builds the mesh and the DTensor from it with ``make_dtensor``.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from ..placements import Partial, Replicate, Shard

__all__ = ["mesh_shapes", "shapes", "placements_for", "layouts", "make_dtensor"]


def mesh_shapes(world_size: int, max_ndim: int = 2) -> st.SearchStrategy[tuple[int, ...]]:
    """Mesh shapes whose product is ``world_size``: (n,) and the 2-d factorisations."""
    options = [(world_size,)]
    if max_ndim >= 2:
        options += [(a, world_size // a) for a in range(2, world_size) if world_size % a == 0]
    return st.sampled_from(options)


def shapes(min_ndim: int = 1, max_ndim: int = 3, min_size: int = 0, max_size: int = 7) -> st.SearchStrategy[tuple[int, ...]]:
    """Small tensor shapes; sizes include 0, 1 and sizes not divisible by the mesh (uneven and empty shards)."""
    return st.lists(st.integers(min_size, max_size), min_size=min_ndim, max_size=max_ndim).map(tuple)


def placements_for(ndim: int, mesh_ndim: int, partial: bool = False) -> st.SearchStrategy[tuple]:
    """One placement per mesh dim for an ``ndim``-d tensor; two mesh dims may shard the same tensor dim."""
    options = [st.just(Replicate())]
    if ndim:
        options.append(st.integers(0, ndim - 1).map(Shard))
    if partial:
        options.append(st.sampled_from(["sum", "avg", "max", "min"]).map(Partial))
    return st.tuples(*[st.one_of(options)] * mesh_ndim)


@st.composite
def layouts(draw, world_size: int, max_ndim: int = 3, min_ndim: int = 1, max_size: int = 7, partial: bool = False):
    """(mesh_shape, shape, placements) for a tensor on a ``world_size``-rank mesh."""
    mesh_shape = draw(mesh_shapes(world_size))
    shape = draw(shapes(min_ndim, max_ndim, 0, max_size))
    placements = draw(placements_for(len(shape), len(mesh_shape), partial))
    return mesh_shape, shape, placements


def make_dtensor(whole: torch.Tensor, mesh, placements, requires_grad: bool = False):
    """A DTensor equal to ``whole`` (same on every rank) laid out as ``placements``; Partial placements get
    a random split into per-rank pieces (seeded alike on every rank) so the reduction is exact for sum."""
    from ..api import distribute_tensor
    from ..dtensor import DTensor

    plain = [Replicate() if p.is_partial() else p for p in placements]
    dt = distribute_tensor(whole, mesh, plain, src_data_rank=None)
    if any(p.is_partial() for p in placements):
        local = dt._local_tensor
        coordinate = mesh.get_coordinate()
        for mesh_dim, p in enumerate(placements):
            if p.is_partial():
                local = _split_partial(local, p.reduce_op, mesh.size(mesh_dim), coordinate[mesh_dim])
        dt = DTensor.from_local(local, mesh, placements, shape=whole.shape, stride=whole.stride())
    return dt.detach().requires_grad_(requires_grad)


def _split_partial(local: torch.Tensor, reduce_op: str, n: int, index: int) -> torch.Tensor:
    if reduce_op == "product":  # factors whose product is local exactly (powers of two), never 1s a sum would pass
        if not local.is_floating_point():
            return local if index == 0 else torch.ones_like(local)
        return local / 2 ** (n - 1) if index == 0 else torch.full_like(local, 2.0)
    if reduce_op in ("avg", "max", "min") or not local.is_floating_point():
        if reduce_op in ("max", "min") and local.is_floating_point():
            generator = torch.Generator().manual_seed(7 + index)
            noise = torch.rand(local.shape, generator=generator, dtype=local.dtype)
            return local - noise if reduce_op == "max" and index else (local + noise if index else local)
        return local if reduce_op != "sum" or index == 0 else torch.zeros_like(local)
    # sum: pieces that add up to local exactly in binary (powers of two splits keep it exact)
    return local / n if (n & (n - 1)) == 0 else (local if index == 0 else torch.zeros_like(local))

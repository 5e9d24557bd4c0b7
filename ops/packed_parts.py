"""Packed parts: splitting and joining a dim laid out as ``StridedShard(dim, outer)`` at its group boundaries.

A fused projection packs equal parts side by side, ``[q | k | v]`` (3 groups of D) or ``[gate | up]``. Placed
as ``StridedShard(dim, 3)`` (``ColwiseParallel(packed=3)``), each rank holds its torch.chunk rows of every
group, so cutting the dim where groups end needs no data: rank r's piece of part i is its local rows of the
groups in that part. This file owns that geometry for the split and cat rules (ops/views.py):

    split into parts of k_i whole groups    each part StridedShard(dim, k_i); Shard(dim) where k_i = 1
    cat of such parts (split's backward)    StridedShard(dim, sum of k_i): every part's groups equally wide

Only where one mesh dim alone shards ``dim``: nested shards of it (a Shard on an earlier mesh dim) cut the
groups otherwise, and those are gathered as before. Pure metadata, no tensors, like every rule.
"""

from __future__ import annotations

from dtensor_plus.placements import Placement, Shard, StridedShard, chunk_bounds

from .common import aten

__all__ = ["split_parts", "cat_parts", "same_strided", "local_split"]


def _groups(p: Placement, dim: int) -> tuple[int, bool] | None:
    """(groups, zigzag) of a placement splitting ``dim`` inside equal groups: Shard(dim) is one group."""
    if isinstance(p, Shard) and p.dim == dim:
        return 1, False
    if p.is_strided_shard() and p.dim == dim:
        return p.outer, p.zigzag
    return None


def _part(groups: int, zigzag: bool, dim: int) -> Placement:
    if groups <= 1 and not zigzag:
        return Shard(dim)  # one group (or an empty part, whose every block is empty) is a plain block
    return StridedShard(dim, max(groups, 1), zigzag)


def _alone(placements_of_inputs, dim: int, mesh_dim: int) -> bool:
    """Does ``mesh_dim`` alone split ``dim`` in every input?"""
    return not any(
        (q.is_shard(dim) or (q.is_strided_shard() and q.dim == dim))
        for placements in placements_of_inputs for k, q in enumerate(placements) if k != mesh_dim
    )


def split_parts(spec, dim: int, sizes) -> dict[int, list[Placement]]:
    """{mesh dim: one placement per part} where ``spec`` is StridedShard on ``dim`` and every part is whole
    groups of it (e.g. 3*D split into D, D, D, or 2*D, D); the input then stays as it is."""
    result = {}
    for k, p in enumerate(spec.placements):
        if not (p.is_strided_shard() and p.dim == dim) or not _alone([spec.placements], dim, k):
            continue
        inner = spec.shape[dim] // p.outer
        if inner == 0 or any(size % inner for size in sizes):
            continue
        result[k] = [_part(size // inner, p.zigzag, dim) for size in sizes]
    return result


def cat_parts(specs, dim: int, mesh_shape) -> dict[int, Placement]:
    """{mesh dim: output placement} where every input splits ``dim`` inside groups of one width on that mesh
    dim alone (Shard(dim) pieces of equal size, or StridedShards as split_parts makes them): the local cat of
    the blocks is then the block of StridedShard(dim, total groups)."""
    result = {}
    for k in range(len(mesh_shape)):
        found = [_groups(spec.placements[k], dim) for spec in specs]
        if any(f is None for f in found) or len({zigzag for _, zigzag in found}) != 1:
            continue
        if not _alone([spec.placements for spec in specs], dim, k):
            continue
        widths = {spec.shape[dim] // groups for spec, (groups, _) in zip(specs, found)}
        if len(widths) != 1 or 0 in widths or any(spec.shape[dim] % groups for spec, (groups, _) in zip(specs, found)):
            continue
        result[k] = _part(sum(groups for groups, _ in found), found[0][1], dim)
    return result


def same_strided(specs, dim: int, packed: dict) -> dict:
    """{mesh dim: StridedShard} where every input holds the same one, of a dim of one size other than ``dim``."""
    kept = {}
    for k in range(len(specs[0].placements)):
        found = {(s.placements[k], s.shape[s.placements[k].dim]) if s.placements[k].is_strided_shard() else None
                 for s in specs}
        if k not in packed and len(found) == 1 and None not in found:
            (p, _), = found
            if p.dim != dim:
                kept[k] = p
    return kept


_SPLIT_WITH_SIZES = {
    aten.split.Tensor: aten.split_with_sizes.default,
    aten.split_with_sizes.default: aten.split_with_sizes.default,
    aten.split_copy.Tensor: aten.split_with_sizes_copy.default,
    aten.split_with_sizes_copy.default: aten.split_with_sizes_copy.default,
    aten.unsafe_split.Tensor: aten.unsafe_split_with_sizes.default,
}


def local_split(func, mesh, mesh_dim: int, dim: int, sizes, parts: list[Placement]):
    """The local op of a packed split: this rank's block of each part, read off at run time from its index
    on ``mesh_dim`` (blocks of uneven or empty groups included)."""
    split_with_sizes = _SPLIT_WITH_SIZES[func]

    def split_locally(x, *args, **kwargs):
        n, index = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
        local = [p.local_size(size, n, index) if p.is_strided_shard() else chunk_bounds(size, n, index)[1]
                 for p, size in zip(parts, sizes)]
        return split_with_sizes(x, local, dim)

    return split_locally

"""Whether a Shard of a dim made of equal blocks cuts only between blocks, and the matching Shard of the dim that
counts the blocks.

A dim of ``num_blocks * block`` entries (group norm's channels in groups, im2col's C * kh * kw rows in blocks of
kh * kw) and a dim of ``num_blocks`` entries (the groups; im2col's channels) correspond when every rank's chunk of
the first is exactly ``block`` times its chunk of the second: then an op that treats each block as a unit keeps
the Shard, one dim's chunks becoming the other's. ``torch.chunk`` sizes do not always agree: 3 channels of 4
entries on 2 ranks chunk the 12 rows 6 + 6, the channels 2 + 1. The answer comes from the global sizes and the
placements alone, so every rank takes the same branch.
"""

from __future__ import annotations

import itertools

from dtensor_plus.placements import Placement, Replicate, Shard
from dtensor_plus.spec import local_shape_and_offset


def keeps_blocks(placements: tuple[Placement, ...], dim: int, mesh_shape, num_blocks: int, block: int) -> bool:
    """True when the Shards of tensor dim ``dim`` in ``placements`` (nested in mesh-dim order) chunk a dim of
    ``num_blocks * block`` entries exactly ``block`` times as they chunk a dim of ``num_blocks``, on every rank."""
    on_dim = tuple(Shard(0) if p.is_shard(dim) else Replicate() for p in placements)
    if all(p.is_replicate() for p in on_dim):
        return True
    for coordinate in itertools.product(*(range(n) for n in mesh_shape)):
        (long,), (long_offset,) = local_shape_and_offset((num_blocks * block,), mesh_shape, on_dim, coordinate)
        (short,), (short_offset,) = local_shape_and_offset((num_blocks,), mesh_shape, on_dim, coordinate)
        if (long, long_offset) != (short * block, short_offset * block):
            return False
    return True


def decide(mesh_shape, per_mesh_dim: list[tuple], mesh_dim_rule, dim: int, num_blocks: int, block: int) -> list[tuple]:
    """``mesh_dim_rule(placements, allow_blocks)`` on every mesh dim (``per_mesh_dim[k]``: the placements it
    reads there), where element 0 of its answer is Shard(``dim``) when it keeps the block dim sharded. Keeps
    block shards on as many mesh dims as still cut whole blocks: the innermost is refused (gathered) first."""
    allowed = [True] * len(per_mesh_dim)
    while True:
        decided = [mesh_dim_rule(ps, ok) for ps, ok in zip(per_mesh_dim, allowed)]
        placements = tuple(d[0] for d in decided)
        on_dim = [k for k, p in enumerate(placements) if p.is_shard(dim)]
        if not on_dim or keeps_blocks(placements, dim, mesh_shape, num_blocks, block):
            return decided
        allowed[on_dim[-1]] = False

"""Do the ranks' local blocks make one global tensor? The cross-rank check behind ``DTensor.from_local``.

``from_local(run_check=True)`` runs it at once and takes the global shape from it. ``from_local`` without
run_check and without ``shape`` guesses even Shard blocks (global size = local size x mesh dim size); where the
guess is wrong the ranks disagree on the global shape, and the next collective sends buffers of different sizes,
which gloo answers by aborting the process (SIGABRT). So such a DTensor is marked, and the first op that uses it
(or its first redistribute) runs the check instead: one small all-gather per mesh dim, once. Every other
``from_local`` is trusted as its caller said (``shape=`` given, or Replicate/Partial blocks that are whole-shaped).

Each rank contributes one fixed-width row of int64 (so the gather itself never mismatches, whatever the blocks):
its tensor's ndim, dtype and placements, its block's shape and the global shape it assumed. Every rank gathers
every row and reaches the same verdict, so a mismatch raises the same ValueError on every rank, naming the ranks,
the values and the fix, and never reaches a collective that would abort or hang.
"""

from __future__ import annotations

import zlib

import torch

from .collectives import every_rank_rows
from .dispatcher import DISPATCHER  # unchecked_blocks: dispatch looks for marks only while it is > 0
from .spec import local_shape_and_offset

__all__ = ["checked_global_shape", "mark_unchecked", "check_marked"]

_MAX_DIMS = 16  # shapes travel padded to this many dims; a row is 3 + 2 * _MAX_DIMS int64s
_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)
_UNCHECKED = "_dtensor_plus_blocks_unchecked"


def checked_global_shape(local: torch.Tensor, mesh, placements, assumed_shape=None) -> tuple[int, ...]:
    """The global shape the blocks of every rank of ``mesh`` make under ``placements`` (one all-gather per
    mesh dim). Raises ValueError on every rank alike where their ndims, dtypes or placements differ, where a
    block does not fit the torch.chunk layout of that shape, or where a rank ``assumed_shape`` another one."""
    row = _row(local.shape, local.dtype, placements, assumed_shape)
    table, ranks = every_rank_rows(row, mesh)
    first = table[0]
    _same_everywhere(table, ranks, 0, "numbers of dims", lambda v: str(v), "pass blocks of one tensor")
    _same_everywhere(table, ranks, 1, "dtypes", lambda v: str(_DTYPES[v]),
                     "cast every block to one dtype, e.g. local.to(torch.float32)")
    _same_everywhere(table, ranks, 2, "placements", lambda v: "other", f"pass the same placements on every rank "
                     f"(this rank passed {list(placements)})")
    ndim = int(first[0])
    if ndim > _MAX_DIMS:
        raise ValueError(f"from_local: checking blocks of {ndim} dims is not supported (at most {_MAX_DIMS}); pass "
                         f"shape= with the global shape instead")
    blocks = table[:, 3: 3 + ndim]
    coordinates = [mesh.coordinate_of(r) for r in ranks]
    shape = _global_shape(blocks, coordinates, mesh, placements)
    for block, coordinate, rank in zip(blocks.tolist(), coordinates, ranks):
        expected = list(local_shape_and_offset(shape, mesh.shape, placements, coordinate)[0])
        if block != expected:
            raise ValueError(_misfit_message(blocks, ranks, coordinates, mesh, placements, shape, rank, block, expected))
    if assumed_shape is not None:
        for assumed, rank in zip(table[:, 3 + _MAX_DIMS: 3 + _MAX_DIMS + ndim].tolist(), ranks):
            if tuple(assumed) != shape:
                raise ValueError(
                    f"DTensor.from_local without shape= or run_check=True assumed even Shard blocks, so rank {rank} "
                    f"took the global shape to be {tuple(assumed)}, but the blocks of all ranks make {shape}; pass "
                    f"shape={shape} (or run_check=True) to from_local"
                )
    return shape


def mark_unchecked(dtensor) -> None:
    """Mark a DTensor whose global shape from_local guessed: its first op or redistribute checks it."""
    if dtensor._spec.mesh.get_coordinate() is None:  # a rank outside the mesh takes part in no check
        return
    setattr(dtensor, _UNCHECKED, True)
    DISPATCHER.unchecked_blocks += 1


def check_marked(dtensors) -> None:
    """Check the marked DTensors among ``dtensors`` (at their first op; every rank marked them alike)."""
    for dt in dtensors:
        if getattr(dt, _UNCHECKED, False):
            setattr(dt, _UNCHECKED, False)
            DISPATCHER.unchecked_blocks -= 1
            spec = dt._spec
            checked_global_shape(dt._local_tensor, spec.mesh, spec.placements, tuple(spec.shape))


def _row(block_shape, dtype, placements, assumed_shape) -> torch.Tensor:
    def padded(shape):
        shape = list(shape or ())[:_MAX_DIMS]
        return shape + [-1] * (_MAX_DIMS - len(shape))

    placements_code = zlib.crc32(repr(tuple(placements)).encode())
    header = [len(block_shape), _DTYPES.index(dtype), placements_code]
    return torch.tensor(header + padded(block_shape) + padded(assumed_shape), dtype=torch.int64)


def _same_everywhere(table, ranks, column: int, what: str, show, fix: str) -> None:
    values = table[:, column]
    if (values != values[0]).any():
        by_rank = {rank: show(int(v)) for rank, v in zip(ranks, values.tolist())}
        shown = ", ".join(f"rank {r}: {v}" for r, v in by_rank.items()) if what != "placements" else \
            f"ranks {[r for r, v in zip(ranks, values.tolist()) if v != values[0]]} differ from rank {ranks[0]}"
        raise ValueError(f"from_local: the local tensors' {what} differ across ranks ({shown}); {fix}")


def _global_shape(blocks, coordinates, mesh, placements) -> tuple[int, ...]:
    """Each dim's global size: the sum of the blocks along the mesh dims that shard it (at coordinate 0 of the
    others), or rank 0's block size where no mesh dim shards it."""
    shape = []
    for dim in range(blocks.shape[1]):
        sharding = {m for m, p in enumerate(placements) if (p.is_shard() or p.is_strided_shard()) and p.dim == dim}
        on_axis = [i for i, c in enumerate(coordinates) if all(c[m] == 0 for m in range(mesh.ndim) if m not in sharding)]
        shape.append(int(blocks[on_axis, dim].sum()) if sharding else int(blocks[0, dim]))
    return tuple(shape)


def _misfit_message(blocks, ranks, coordinates, mesh, placements, shape, rank, block, expected) -> str:
    for dim in range(len(shape)):
        sizes = blocks[:, dim].tolist()
        sharded = any((p.is_shard() or p.is_strided_shard()) and p.dim == dim for p in placements)
        if not sharded and len(set(sizes)) > 1:
            return (f"from_local: local shapes differ in dim {dim} across ranks ({dict(zip(ranks, sizes))} by rank) "
                    f"although no mesh dim shards it; pass matching local tensors")
        if block[dim] != expected[dim]:
            want = [local_shape_and_offset(shape, mesh.shape, placements, c)[0][dim] for c in coordinates]
            return (f"from_local: shard sizes {sizes} of dim {dim} on ranks {ranks} under {list(placements)} are not "
                    f"torch.chunk sizes of {shape[dim]} ({want}); pass each rank its torch.chunk block, or "
                    f"distribute_tensor the whole tensor")
    return f"from_local: rank {rank} holds a block of shape {tuple(block)} where {tuple(expected)} fits"

"""Which global entries a block holds, per tensor dim, and where two blocks overlap.

A checkpoint chunk and a loading rank's block are both described the same way: for each tensor dim, a list of
*runs* ``(global_start, length)`` in the block's local order. A ``Shard`` block has one run per dim; a
``StridedShard`` (placements.py) holds ``outer`` groups of pieces of a dim, so several runs. The block is the
cartesian product of its dims' runs. Every split is taken from the placements' own geometry
(``chunk_bounds``, ``StridedShard.pieces``), applied in mesh-dim order as ``spec.local_shape_and_offset``
applies it, so a nested split cuts the block the earlier mesh dims left.

``overlap`` pairs a target block with a saved chunk dim by dim: ``(dst_start, src_start, length)`` triples in
local coordinates, merged where both sides run on, so the common case is one triple per dim (one slice read).
``cover_error`` says whether a set of blocks holds every entry of a block exactly once (load checks the chunks
that overlap its target block before copying any: a gap would leave target entries unfilled, an overlap would
let the later chunk win; save checks its plan with it).
"""

from __future__ import annotations

import bisect

import numpy as np

from ..placements import Shard, StridedShard, chunk_bounds

__all__ = ["Runs", "whole_runs", "local_runs", "local_shape", "num_elements", "overlap", "cover_error", "MAX_CELLS"]

# cover_error counts on a grid of cells (one int32 each); save's own blocks make about one cell per block and
# strided piece, so this bound is only met by an index that was edited into millions of fragments.
MAX_CELLS = 1 << 24

Runs = list[list[tuple[int, int]]]  # per tensor dim: (global_start, length), in local order


def whole_runs(shape) -> Runs:
    return [[(0, size)] if size else [] for size in shape]


def local_runs(shape, mesh_shape, placements, coordinate) -> Runs:
    """The runs of the block that mesh ``coordinate`` holds of a ``shape`` tensor laid out as ``placements``.

    Replicate and Partial mesh dims do not cut the block (a Partial block has the full extent)."""
    runs = whole_runs(shape)
    for mesh_dim, placement in enumerate(placements):
        n, index = mesh_shape[mesh_dim], coordinate[mesh_dim]
        if isinstance(placement, Shard):
            d = placement.dim
            start, length = chunk_bounds(_total(runs[d]), n, index)
            runs[d] = _take(runs[d], start, length)
        elif isinstance(placement, StridedShard):
            d = placement.dim
            inner = _total(runs[d]) // placement.outer
            pieces = placement.pieces(inner, n, index)
            taken = [_take(runs[d], o * inner + start, length) for o in range(placement.outer) for start, length in pieces]
            runs[d] = _merge([run for part in taken for run in part])
    return runs


def num_elements(runs: Runs) -> int:
    out = 1
    for dim_runs in runs:
        out *= _total(dim_runs)
    return out


def local_shape(runs: Runs) -> tuple[int, ...]:
    return tuple(_total(dim_runs) for dim_runs in runs)


def overlap(dst: Runs, src: Runs) -> list[list[tuple[int, int, int]]] | None:
    """Per dim, ``(dst_local_start, src_local_start, length)`` where the two blocks share global entries;
    None when they share none."""
    out = []
    for dst_runs, src_runs in zip(dst, src):
        triples = _merge_triples(_overlap_dim(dst_runs, src_runs))
        if not triples:
            return None
        out.append(triples)
    return out


def cover_error(shape, blocks: list[Runs], target: Runs | None = None) -> str | None:
    """None when ``blocks`` hold every entry of a ``shape`` block exactly once; else what is wrong, naming the
    first entry held twice or never. With ``target`` (the runs of that block in its tensor), ``blocks`` are in
    the block's local coordinates and the entry is named by its global index.

    Every run boundary of every block cuts its dim, so each block is a union of whole cells of the grid those
    cuts make; one count per cell (not per entry) then decides it, in O(cells), never O(blocks^2)."""
    cuts = [sorted({0, size} | {p for block in blocks for start, length in block[d] for p in (start, start + length)})
            for d, size in enumerate(shape)]
    num_cells = 1
    for dim_cuts in cuts:
        num_cells *= len(dim_cuts) - 1
    if num_cells > MAX_CELLS:
        return f"its chunks cut it into {num_cells} pieces, more than the {MAX_CELLS} a check of their coverage allows"
    counts = np.zeros([len(c) - 1 for c in cuts], dtype=np.int32)
    for block in blocks:
        cells = [[(bisect.bisect_left(c, start), bisect.bisect_left(c, start + length)) for start, length in dim_runs]
                 for dim_runs, c in zip(block, cuts)]
        if all(len(dim_cells) == 1 for dim_cells in cells):  # a box (and a 0-d tensor): one slice
            counts[tuple(slice(lo, hi) for (lo, hi), in cells)] += 1
        else:  # several runs in some dim (strided blocks): an indexed add
            index = [np.concatenate([np.arange(lo, hi) for lo, hi in dim_cells] or [np.zeros(0, dtype=np.int64)])
                     for dim_cells in cells]
            if all(len(np.unique(i)) == len(i) for i in index):
                counts[np.ix_(*index)] += 1
            else:  # runs that overlap each other (an edited index): unbuffered, so a repeated cell counts twice
                np.add.at(counts, np.ix_(*index), 1)
    wrong = np.argwhere(counts != 1)
    if not len(wrong):
        return None
    cell = tuple(int(i) for i in wrong[0])
    entry = [c[i] for c, i in zip(cuts, cell)]
    if target is not None:
        entry = [_global_position(dim_runs, position) for dim_runs, position in zip(target, entry)]
    return f"its chunks hold the entry at {entry} {int(counts[cell])} times (every entry must be held exactly once)"


def _global_position(runs, position: int) -> int:
    """The global index of local ``position`` in a dim's runs."""
    for start, length in runs:
        if position < length:
            return start + position
        position -= length
    raise AssertionError(f"local position {position} past the runs {runs}")


def _total(runs) -> int:
    return sum(length for _, length in runs)


def _take(runs, start: int, length: int) -> list[tuple[int, int]]:
    """Local positions [start, start + length) of a run list, as runs."""
    out, position, end = [], 0, start + length
    for global_start, run_length in runs:
        lo, hi = max(start, position), min(end, position + run_length)
        if lo < hi:
            out.append((global_start + lo - position, hi - lo))
        position += run_length
    return out


def _merge(runs) -> list[tuple[int, int]]:
    out = []
    for start, length in runs:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        elif length:
            out.append((start, length))
    return out


def _with_local_starts(runs):
    """(global_start, length, local_start) sorted by global start (a zigzag's runs are not in global order)."""
    out, position = [], 0
    for start, length in runs:
        out.append((start, length, position))
        position += length
    return sorted(out)


def _overlap_dim(dst_runs, src_runs) -> list[tuple[int, int, int]]:
    """Two-pointer sweep over both run lists in global order: O(runs), not O(runs^2), for long strided lists."""
    dst, src = _with_local_starts(dst_runs), _with_local_starts(src_runs)
    out, i, j = [], 0, 0
    while i < len(dst) and j < len(src):
        d_start, d_len, d_local = dst[i]
        s_start, s_len, s_local = src[j]
        lo, hi = max(d_start, s_start), min(d_start + d_len, s_start + s_len)
        if lo < hi:
            out.append((d_local + lo - d_start, s_local + lo - s_start, hi - lo))
        if d_start + d_len <= s_start + s_len:
            i += 1
        else:
            j += 1
    return sorted(out)


def _merge_triples(triples) -> list[tuple[int, int, int]]:
    out = []
    for dst, src, length in triples:
        if out and out[-1][0] + out[-1][2] == dst and out[-1][1] + out[-1][2] == src:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + length)
        else:
            out.append((dst, src, length))
    return out

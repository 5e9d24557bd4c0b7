"""The dimension algebra behind the view and shape rules: pure geometry on global shapes, no tensors.

A view from an input shape to an output shape factors into *groups* (``view_groups``): runs of input dims
and output dims with equal products, plus size-1 dims on their own. Each group is one of

    whole        (a)       -> (a)          a Shard of a passes through unchanged
    flatten      (a, b, c) -> (a*b*c)      only a Shard of the outermost dim a can survive, and only
    split        (a*b)     -> (a, b)       where the blocks align: each rank's block of the group, read
    both         (a, b)    -> (c, d)       flat, is a torch.chunk block of the first output dim
    new dim      ()        -> (1)          nothing to carry
    dropped dim  (1)       -> ()           a Shard of it must be gathered first

"Align" is checked exactly (``blocks_align``), over every mesh coordinate, with several mesh dims sharding
one tensor dim nested in mesh-dim order: the longest aligned prefix of those mesh dims keeps its sharding,
the rest are gathered. (B, T, D) -> (B*T, D) with B % n == 0 aligns; with B = 3 over 2 ranks it does not.

A Shard that a flatten puts behind unsharded dims, (B, H) -> (B*H) with H split, becomes a StridedShard of
the merged dim (``strided_view_placements``): B groups, the rows inside each split. Splitting it again where
the groups end, (B*H) -> (B, H), gives back Shard(1); a split whose output dim holds the inner factor keeps
it strided there (striped (B*T) -> (B, T): StridedShard(0, B*T/n) -> StridedShard(1, T/n), so a linear
layer's fold and unfold move nothing); a view that leaves the dim alone keeps it, a flatten that puts it
behind more dims keeps it with a larger ``outer`` (where its pieces stay whole rows); any other view gathers
it. A zigzag StridedShard (load-balanced context parallelism) follows the same algebra with 2n pieces:
(B, T) -> (B*T) with T zigzag is StridedShard(0, B, zigzag=True), and back to StridedShard(1, 1, zigzag=True).
This is what keeps attention heads sharded through ``matmul``'s (B*H, T, K) ``bmm``. A dim split by several
mesh dims (nested levels, each cutting the piece the one before left: USP's ring then Ulysses) keeps every
level the same way, each reading its piece as the same (outer, inner): (B, T) with T on two mesh dims folds
to StridedShard(0, B) on both and splits back to Shard(1) on both (zigzag pieces do not nest: gathered).

Slicing uses the same check (``slice_aligns``): a slice of a sharded dim stays sharded where each rank's
part of the slice is exactly its torch.chunk block of the result (e.g. x[:, :-1] of an even split).

Every rule here only moves, copies or zero-fills elements, so Partial placements of any reduce op pass
through (``propagate``); a zero is the identity of sum and avg and is the same on every rank for max/min.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

from dtensor_plus.placements import Placement, Replicate, Shard, StridedShard, chunk_bounds

__all__ = ["view_groups", "nested_blocks", "blocks_align", "aligned_out_dims", "view_out_dims", "infer_shape",
           "slice_range", "slice_aligns", "local_slice", "sliced_out_dims", "propagate", "dim_map_out_dims", "always",
           "strided_view_placements"]


def infer_shape(numel: int, shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` with a -1 entry resolved for a tensor of ``numel`` elements (as view/reshape do)."""
    shape = [int(s) for s in shape]
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = numel // known if known else 0
    return tuple(shape)


def view_groups(in_shape, out_shape) -> list[tuple[tuple[int, ...], tuple[int, ...]]] | None:
    """(input dims, output dims) groups of a view; size-1 dims alone (paired when both sides have one).

    None when the tensor has no elements: products of zero do not factor.
    """
    if math.prod(in_shape) == 0:
        return None
    groups, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        in_one = i < len(in_shape) and in_shape[i] == 1
        out_one = j < len(out_shape) and out_shape[j] == 1
        if in_one or out_one:
            groups.append(((i,) if in_one else (), (j,) if out_one else ()))
            i, j = i + in_one, j + out_one
            continue
        ins, outs, p_in, p_out = [i], [j], in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while p_in != p_out:  # equal numel guarantees both sides run out together
            if p_in < p_out:
                ins.append(i)
                p_in, i = p_in * in_shape[i], i + 1
            else:
                outs.append(j)
                p_out, j = p_out * out_shape[j], j + 1
        groups.append((tuple(ins), tuple(outs)))
    return groups


def nested_blocks(size: int, mesh_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(offset, length) of every block of a ``size``-long dim sharded by nested mesh dims of ``mesh_sizes``,
    over all their coordinates in row-major order (the outer mesh dim splits first, like torch.chunk)."""
    blocks = []
    for coordinate in itertools.product(*(range(n) for n in mesh_sizes)):
        offset, length = 0, size
        for n, index in zip(mesh_sizes, coordinate):
            start, length = chunk_bounds(length, n, index)
            offset += start
        blocks.append((offset, length))
    return blocks


def blocks_align(in_size: int, in_inner: int, out_size: int, out_inner: int, mesh_sizes) -> bool:
    """Do the blocks of an ``in_size`` dim (rows of ``in_inner`` elements) cover the same flat ranges as the
    blocks of an ``out_size`` dim (rows of ``out_inner``) on every mesh coordinate?"""
    pairs = zip(nested_blocks(in_size, mesh_sizes), nested_blocks(out_size, mesh_sizes))
    for (a_off, a_len), (b_off, b_len) in pairs:
        if a_len * in_inner != b_len * out_inner or (a_len and a_off * in_inner != b_off * out_inner):
            return False
    return True


def aligned_out_dims(placements, mesh_shape, carriers: dict) -> list[int | None]:
    """For each mesh dim: the output dim its Shard lands on, or None where it must be gathered first.

    ``carriers[d] = (output dim, aligns)``: input dim d can carry a Shard to that output dim while
    ``aligns(mesh_sizes)`` holds for the mesh dims sharding d so far (outermost first). Once one fails, it
    and every inner mesh dim sharding d are gathered: nesting cannot skip a level.
    """
    result, prefix, broken = [], {}, set()
    for mesh_dim, p in enumerate(placements):
        if not isinstance(p, Shard):
            result.append(None)
            continue
        d = p.dim
        prefix.setdefault(d, []).append(mesh_shape[mesh_dim])
        if d in carriers and d not in broken and carriers[d][1](prefix[d]):
            result.append(carriers[d][0])
            continue
        broken.add(d)
        result.append(None)
    return result


def always(mesh_sizes) -> bool:
    return True


def view_out_dims(in_shape, out_shape, placements, mesh_shape) -> list[int | None]:
    """aligned_out_dims of a view: the lead dim of each group carries its Shard where the blocks align."""
    groups = view_groups(in_shape, out_shape)
    if groups is None:  # no elements: only an unchanged shape keeps its layout
        carriers = {d: (d, always) for d in range(len(in_shape))} if tuple(in_shape) == tuple(out_shape) else {}
        return aligned_out_dims(placements, mesh_shape, carriers)
    carriers = {}
    for ins, outs in groups:
        if ins and outs:
            in_inner = math.prod(in_shape[d] for d in ins[1:])
            out_inner = math.prod(out_shape[d] for d in outs[1:])
            aligns = functools.partial(blocks_align, in_shape[ins[0]], in_inner, out_shape[outs[0]], out_inner)
            carriers[ins[0]] = (outs[0], aligns)
    return aligned_out_dims(placements, mesh_shape, carriers)


def strided_view_placements(in_shape, out_shape, placements, mesh_shape, out_dims) -> dict[int, Placement]:
    """The mesh dims whose layout a view changes to or from a StridedShard: {mesh dim: output placement}.

    ``out_dims`` is ``view_out_dims``' answer; a mesh dim it gathers may instead become a StridedShard, and
    every StridedShard input appears here (kept, unmade into a Shard, or Replicate: gathered). Earlier mesh
    dims may shard the lead dim of the group with whole blocks of it (B on dp, evenly): the StridedShard
    then splits inside their blocks.
    """
    groups = view_groups(in_shape, out_shape)
    if groups is None:
        groups = [((d,), (d,)) for d in range(len(in_shape))] if tuple(in_shape) == tuple(out_shape) else []
    group_of = {d: (ins, outs) for ins, outs in groups for d in ins}
    result = {}
    for k, p in enumerate(placements):
        if not (p.is_strided_shard() or (isinstance(p, Shard) and out_dims[k] is None)):
            continue
        group = group_of.get(p.dim)
        found = _outer_blocks(k, p, group, in_shape, placements, mesh_shape, out_dims, result)
        blocks, levels, outer_level = found if found is not None else (None, None, None)
        if p.is_strided_shard():
            made = _from_strided(p, group, in_shape, out_shape, levels, blocks)
        else:
            made = _to_strided(p.dim, group, in_shape, levels, blocks) if blocks is not None else None
        if outer_level is not None and made != outer_level:  # a level must land where the one outside it did
            made = Replicate() if p.is_strided_shard() else None
        if made is not None:
            result[k] = made
    return result


def _outer_blocks(k, p, group, in_shape, placements, mesh_shape, out_dims, result) -> tuple | None:
    """(blocks, levels, outer level): how many whole blocks earlier mesh dims cut the group's lead dim into
    (1: none); the sizes of the mesh dims that split ``p``'s dim as nested levels of the same split, outermost
    first, ending with mesh dim k's own; the output placement of the level just outside k (None: k is the
    first). None where other mesh dims split the group otherwise (unevenly, another dim of it, inside mesh
    dim k, or an earlier level that does not stay split).

    Nested levels are what a sequence split over two mesh dims is (USP's ring and Ulysses, the double ring):
    (B, T) with T Shard on both folds to StridedShard(0, B) on both, each cutting the piece the one before left,
    and splits back. Every level reads its piece as the same (outer, inner), so they share ``blocks``: the
    whole-block Shards of the lead dim must come before the first level."""
    if group is None or not group[1]:  # a size-1 dim the view drops: no output dim to carry blocks
        return None
    ins, outs = group
    blocks, levels, outer_level = 1, [], None
    for j, q in enumerate(placements):
        if not ((q.is_shard() or q.is_strided_shard()) and q.dim in ins):
            continue
        if j == k or _nested_level(p, q, out_dims[j]):
            if j < k:
                outer_level = result.get(j)
                if outer_level is None or outer_level.is_replicate():
                    return None  # an outer level gathered: an inner one cannot stay split inside the whole dim
            if j <= k:
                levels.append(mesh_shape[j])
            continue
        if j > k or levels or not q.is_shard(ins[0]) or out_dims[j] != outs[0]:
            return None
        blocks *= mesh_shape[j]
    return (blocks, levels, outer_level) if in_shape[ins[0]] % blocks == 0 else None


def _nested_level(p, q, out_dim) -> bool:
    """Is ``q`` (on another mesh dim) one more level of ``p``'s split: the same StridedShard (zigzag pieces do
    not nest), or both Shards of the same dim that this view makes strided?"""
    if p.is_strided_shard():
        return q == p and not p.zigzag
    return q.is_shard(p.dim) and out_dim is None


def _to_strided(d, group, in_shape, levels, blocks) -> StridedShard | None:
    """A flatten (a, .., d, ..) -> (e) with d, not the lead, split by nested mesh dims of sizes ``levels``
    inside ``blocks`` of a."""
    ins, outs = group
    if len(outs) != 1 or ins[0] == d:
        return None
    at = ins.index(d)
    outer, inner = math.prod(in_shape[i] for i in ins[:at]) // blocks, math.prod(in_shape[i] for i in ins[at + 1 :])
    if not blocks_align(in_shape[d], inner, in_shape[d] * inner, 1, levels):
        return None
    return StridedShard(outs[0], outer)


def _from_strided(p: StridedShard, group, in_shape, out_shape, levels, blocks) -> Placement:
    """Where a StridedShard input goes: kept on an untouched dim or behind dims a flatten puts before it,
    onto the output dim of a split that holds its inner factor (``_split_strided``); else gathered."""
    if blocks is None:
        return Replicate()
    ins, outs = group
    if len(outs) == 1:
        return _flattened_strided(p, ins, outs[0], in_shape, levels, blocks)
    if ins != (p.dim,):
        return Replicate()
    return _split_strided(p, outs, [out_shape[e] for e in outs], in_shape[p.dim], levels, blocks)


def _split_strided(p: StridedShard, outs, sizes, size: int, levels, blocks: int) -> Placement:
    """(e) -> (s_0, .., s_m) with e strided, read as (blocks * outer, inner). Output dim ``at`` keeps it
    where it holds the inner factor: inner = inner' * (s_at+1 * .. * s_m) with inner' dividing s_at, and
    each rank's pieces of inner are whole rows of the trailing dims. Then s_at reads as (o', inner') with
    the same pieces: StridedShard(at, o'), a plain Shard where o' is 1 (the groups end at s_at). Striped
    (B*T) -> (B, T) is StridedShard(0, B*T/n) -> StridedShard(1, T/n); o' > 1 stays strided. Nested
    ``levels`` (mesh sizes, outermost first) each cut the piece the one before left: every piece of every
    level must be whole rows of the trailing dims, and each level gets the same placement."""
    inner = size // (p.outer * blocks)
    for at in reversed(range(len(sizes))):  # the innermost candidate: an earlier one would cut inner' = 1
        trailing = math.prod(sizes[at + 1 :])
        if inner % trailing or sizes[at] % (inner // trailing):
            continue
        inner_at = inner // trailing
        if not blocks_align(inner_at, trailing, inner, 1, _pieces(p, levels)):
            continue
        # blocks cut the lead output dim: at 0 the new outer counts groups inside its blocks, like p.outer
        outer = sizes[at] // inner_at // (blocks if at == 0 else 1)
        return p.with_dim(outs[at], outer) if p.zigzag or outer > 1 else Shard(outs[at])
    return Replicate()


def _pieces(p: StridedShard, levels) -> list[int]:
    """The nested torch.chunk cuts of the inner factor: the levels' mesh sizes, or 2n pieces for a zigzag
    (one level: zigzag pieces do not nest)."""
    return [2 * levels[0]] if p.zigzag else list(levels)


def _flattened_strided(p: StridedShard, ins, out: int, in_shape, levels, blocks) -> Placement:
    """(a, .., d, c, ..) -> (e) with d strided: e read as (a.. * outer, inner * c..), where the pieces of the
    inner factor stay whole rows of c.. (always when c.. is empty: (B, T) -> (B*T) with T zigzag)."""
    at = ins.index(p.dim)
    inner = in_shape[p.dim] // p.outer
    trailing = math.prod(in_shape[i] for i in ins[at + 1 :])
    if not blocks_align(inner, trailing, inner * trailing, 1, _pieces(p, levels)):
        return Replicate()
    lead = math.prod(in_shape[i] for i in ins[:at]) // blocks if at else 1  # blocks cut ins[0], d's leader
    return p.with_dim(out, p.outer * lead)


def slice_range(size: int, start, end, step: int) -> tuple[int, int]:
    """(first index, number of elements) of ``x[start:end:step]`` along a ``size``-long dim, as torch clamps."""
    start = 0 if start is None else start
    end = size if end is None else end
    start = min(max(start + size if start < 0 else start, 0), size)
    end = min(max(end + size if end < 0 else end, start), size)
    return start, -(-(end - start) // step)


def _slice_part(block: tuple[int, int], start: int, step: int, length: int) -> tuple[int, int]:
    """(first slice position j, count) of the slice elements start + step*j that lie in ``block``."""
    offset, size = block
    if size == 0:
        return 0, 0
    first = min(max(-(-(offset - start) // step), 0), length)
    stop = min(max(-(-(offset + size - start) // step), 0), length)
    return first, stop - first


def slice_aligns(size: int, start: int, step: int, length: int, mesh_sizes) -> bool:
    """Is each coordinate's part of the slice exactly its torch.chunk block of the ``length``-long result?"""
    for block, (out_off, out_len) in zip(nested_blocks(size, mesh_sizes), nested_blocks(length, mesh_sizes)):
        first, count = _slice_part(block, start, step, length)
        if count != out_len or (count and first != out_off):
            return False
    return True


def local_slice(block: tuple[int, int], start: int, step: int, length: int) -> tuple[int, int, int]:
    """(local start, local end, count) of this block's part of the slice, in the block's own indices."""
    first, count = _slice_part(block, start, step, length)
    if count == 0:
        return 0, 0, 0
    local_start = start + step * first - block[0]
    return local_start, local_start + step * (count - 1) + 1, count


def sliced_out_dims(placements, mesh_shape, shape, dim: int, start: int, step: int, length: int) -> list[int | None]:
    """aligned_out_dims of a slice of ``dim`` of a ``shape`` tensor: other dims keep their Shard; ``dim``
    where each rank's part of the slice is its block of the result."""
    carriers = {d: (d, always) for d in range(len(shape))}
    carriers[dim] = (dim, functools.partial(slice_aligns, shape[dim], start, step, length))
    return aligned_out_dims(placements, mesh_shape, carriers)


def propagate(placements, out_dims) -> tuple[tuple[Placement, ...], tuple[Placement, ...]]:
    """(input target, output placements): Shard(d) at mesh dim k becomes Shard(out_dims[k]), or is gathered
    (Replicate on both sides) where out_dims[k] is None; Replicate and Partial pass through."""
    inputs, outputs = [], []
    for p, out_dim in zip(placements, out_dims):
        if isinstance(p, Shard) and out_dim is None:
            inputs.append(Replicate())
            outputs.append(Replicate())
        else:
            inputs.append(p)
            outputs.append(Shard(out_dim) if isinstance(p, Shard) else p)
    return tuple(inputs), tuple(outputs)


def dim_map_out_dims(placements, dim_map) -> list[int | None]:
    """out_dims for ops that move whole dims: ``dim_map[d]`` is the output dim of input dim d, or None."""
    return [dim_map.get(p.dim) if isinstance(p, Shard) else None for p in placements]

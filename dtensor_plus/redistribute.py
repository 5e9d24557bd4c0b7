"""Redistribution: the planner (cheapest sequence of one-step transitions), the executor, the autograd Function.

A *one-step transition* changes the placement of one mesh dim and maps to one collective (or none):

    Replicate -> Shard(d)     local chunk                 0 bytes
    Replicate -> Partial      local partition             0 bytes
    Shard(d)  -> Replicate    all-gather                  (n-1) x local
    Shard(d)  -> Shard(e)     all-to-all                  (n-1)/n x local
    Partial   -> Replicate    all-reduce                  2(n-1)/n x local
    Partial   -> Shard(d)     reduce-scatter              (n-1)/n x local
    Replicate -> StridedShard local rows (zigzag: two pieces, cat)   0 bytes
    StridedShard -> Replicate all-gather (zigzag: padded to the longest rank, reordered)  (n-1) x longest

When several mesh dims shard one tensor dim they nest in mesh-dim order, so a transition may only remove
or add the *innermost* (highest) mesh dim sharding a tensor dim; anything else would scramble the order of
the rows. The planner runs Dijkstra over placement tuples with that validity rule and a cost of bytes each
rank sends plus a per-collective latency term, so it finds e.g. all-to-all instead of all-gather + chunk.
"""

from __future__ import annotations

import heapq
import itertools
from functools import lru_cache

import torch

from . import collectives
from .buckets import Buckets, all_reduce_flat
from .placements import Placement, Replicate, Shard
from .spec import DTensorSpec, local_shape_and_offset

__all__ = ["plan_redistribute", "redistribute_cost", "redistribute_local", "redistribute_together",
    "redistribute_together_async"]

# A collective costs this many bytes' worth of latency on top of its traffic, so that among equal-traffic
# plans the one with fewer collectives wins. Local steps cost 1 so that empty steps are never taken.
_LATENCY_BYTES = 4096


def _valid(state: tuple[Placement, ...], mesh_dim: int, new: Placement) -> bool:
    """May mesh dim ``mesh_dim`` change from state[mesh_dim] to ``new`` in one step?"""
    old = state[mesh_dim]
    if old == new or (old.is_partial() and new.is_partial()):
        return False
    if new.is_partial() and not old.is_replicate():
        return False
    outer, inner = state[:mesh_dim], state[mesh_dim + 1 :]
    if old.is_strided_shard():  # only ever gathered, and only as the innermost split of its dim
        return new.is_replicate() and not any(_splits(p, old.dim) for p in inner)
    if new.is_strided_shard():
        # cut inside the blocks outer Shards of its dim leave, or as one more level of the same (not zigzag)
        # StridedShard outside it (a sequence on two mesh dims, folded), never around another split
        d = new.dim
        return (old.is_replicate() and not any(_splits(p, d) for p in inner)
                and not any(p.is_strided_shard() and p.dim == d and (p != new or new.zigzag) for p in outer))
    if isinstance(old, Shard) and any(_splits(p, old.dim) for p in inner):
        return False
    if isinstance(new, Shard) and any(p.is_strided_shard() and p.dim == new.dim for p in outer):
        return False
    return not (isinstance(new, Shard) and any(_splits(p, new.dim) for p in inner))


def _splits(p: Placement, dim: int) -> bool:
    """Does ``p`` split tensor dim ``dim`` (a Shard or a StridedShard of it)?"""
    return p.is_shard(dim) or (p.is_strided_shard() and p.dim == dim)


def _step_cost(state, mesh_dim: int, new: Placement, mesh_shape, numel: int, itemsize: int) -> float:
    num_shards = 1
    for k, p in enumerate(state):
        if p.is_shard() or p.is_strided_shard():
            num_shards *= mesh_shape[k]
    local = numel * itemsize / num_shards
    n, old = mesh_shape[mesh_dim], state[mesh_dim]
    if old.is_replicate():
        return 1.0
    if old.is_partial():
        traffic = 2 * (n - 1) / n * local if new.is_replicate() else (n - 1) / n * local
    else:
        traffic = (n - 1) * local if new.is_replicate() else (n - 1) / n * local
    return traffic + _LATENCY_BYTES


@lru_cache(maxsize=4096)
def plan_redistribute(
    src: tuple[Placement, ...], dst: tuple[Placement, ...], mesh_shape: tuple[int, ...], numel: int, itemsize: int
) -> tuple[tuple[int, Placement], ...]:
    """Cheapest list of (mesh_dim, new_placement) steps from ``src`` to ``dst`` placements."""
    if src == dst:
        return ()
    shard_dims = {p.dim for p in src + dst if isinstance(p, Shard)}
    candidates = [
        {Replicate(), dst[k], *(Shard(d) for d in shard_dims)} | ({src[k]} if src[k].is_partial() else set())
        for k in range(len(src))
    ]
    tie = itertools.count()
    frontier = [(0.0, next(tie), src, ())]
    best = {src: 0.0}
    while frontier:
        cost, _, state, steps = heapq.heappop(frontier)
        if state == dst:
            return steps
        if cost > best.get(state, float("inf")):
            continue
        for k in range(len(state)):
            for new in candidates[k]:
                if not _valid(state, k, new):
                    continue
                nxt = state[:k] + (new,) + state[k + 1 :]
                nxt_cost = cost + _step_cost(state, k, new, mesh_shape, numel, itemsize)
                if nxt_cost < best.get(nxt, float("inf")):
                    best[nxt] = nxt_cost
                    heapq.heappush(frontier, (nxt_cost, next(tie), nxt, steps + ((k, new),)))
    raise AssertionError(f"no redistribution plan from {list(src)} to {list(dst)}")  # unreachable: via Replicate


@lru_cache(maxsize=8192)
def redistribute_cost(
    src: tuple[Placement, ...], dst: tuple[Placement, ...], mesh_shape: tuple[int, ...], numel: int, itemsize: int
) -> float:
    """The cost model's price of the cheapest plan from ``src`` to ``dst``: bytes each rank sends plus the
    per-collective latency term. Rules use it to pick the layout their inputs reach most cheaply."""
    cost, state = 0.0, src
    for mesh_dim, new in plan_redistribute(src, dst, mesh_shape, numel, itemsize):
        cost += _step_cost(state, mesh_dim, new, mesh_shape, numel, itemsize)
        state = state[:mesh_dim] + (new,) + state[mesh_dim + 1 :]
    return cost


def _level_size(spec_shape, mesh, placements, mesh_dim: int, dim: int) -> int:
    """Size of tensor dim ``dim`` as seen by ``mesh_dim``: what the outer mesh dims left of it on this rank."""
    outer = tuple(p if k < mesh_dim else Replicate() for k, p in enumerate(placements))
    return local_shape_and_offset(spec_shape, mesh.shape, outer, mesh.get_coordinate())[0][dim]


def _apply_step(local: torch.Tensor, spec: DTensorSpec, placements, mesh_dim: int, new: Placement) -> torch.Tensor:
    mesh = spec.mesh
    old = placements[mesh_dim]
    n, index = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    if old.is_replicate():
        return new.partition(local, n, index) if new.is_partial() else new.chunk(local, n, index)
    if old.is_strided_shard():  # only ever gathered: gather the inner factor, read as its own dim
        d, outer = old.dim, old.outer
        inner = _level_size(spec.shape, mesh, placements, mesh_dim, d) // outer
        split = local.unflatten(d, (outer, local.shape[d] // outer))
        if old.zigzag:
            return _gather_zigzag(split, old, mesh, mesh_dim, d + 1, inner).flatten(d, d + 1)
        return collectives.all_gather(split, mesh, mesh_dim, d + 1, inner).flatten(d, d + 1)
    if old.is_partial():
        if new.is_replicate():
            return collectives.all_reduce(local, mesh, mesh_dim, old.reduce_op)
        return collectives.reduce_scatter(local, mesh, mesh_dim, new.dim, old.reduce_op)
    size = _level_size(spec.shape, mesh, placements, mesh_dim, old.dim)
    if new.is_replicate():
        return collectives.all_gather(local, mesh, mesh_dim, old.dim, size)
    return collectives.all_to_all(local, mesh, mesh_dim, old.dim, size, new.dim)


def _gather_zigzag(split: torch.Tensor, placement, mesh, mesh_dim: int, dim: int, inner: int) -> torch.Tensor:
    """All-gather of zigzag pieces along ``dim`` (``inner`` long in all), back in natural order. Every rank's
    part is padded to the longest (known from global metadata), gathered as even torch.chunk blocks, then
    each rank's two pieces are put in their places: pieces 0..n-1 are the ranks' first, n..2n-1 their second
    in reverse rank order."""
    n = mesh.size(mesh_dim)
    pieces = [placement.pieces(inner, n, j) for j in range(n)]
    longest = max(sum(length for _, length in rank_pieces) for rank_pieces in pieces)
    gathered = collectives.all_gather(split, mesh, mesh_dim, dim, n * longest)
    held = {}  # (offset, length) of a piece -> its rows, cut from the rank that holds it
    for j, rank_pieces in enumerate(pieces):
        start = j * longest
        for offset, length in rank_pieces:
            held[offset, length] = gathered.narrow(dim, start, length)
            start += length
    return torch.cat([held[key] for key in sorted(held)], dim)


def redistribute_local(local: torch.Tensor, spec: DTensorSpec, dst: tuple[Placement, ...]) -> torch.Tensor:
    """This rank's local tensor of ``spec``'s tensor laid out as ``dst`` instead (no autograd)."""
    if spec.placements == dst:
        return local
    if spec.mesh.get_coordinate() is None:
        return local  # ranks outside the mesh hold nothing and take part in nothing
    for mesh_dim, new, placements in _acting_steps(spec, dst):
        local = _apply_step(local, spec, placements, mesh_dim, new)
    return local


@lru_cache(maxsize=4096)
def _acting_steps(spec: DTensorSpec, dst: tuple[Placement, ...]) -> tuple:
    """The steps of the plan from ``spec`` to ``dst`` that act, each as (mesh_dim, new placement, the placements
    before it): on a single rank every placement holds the whole value as it is, so steps on mesh dims of one
    rank are dropped. Keyed by the spec (its hash is kept) so that a warm move is one lookup."""
    placements, acting = spec.placements, []
    for mesh_dim, new in plan_redistribute(placements, dst, spec.mesh.shape, spec.shape.numel(), spec.dtype.itemsize):
        if spec.mesh.shape[mesh_dim] > 1:
            acting.append((mesh_dim, new, placements))
        placements = placements[:mesh_dim] + (new,) + placements[mesh_dim + 1 :]
    return tuple(acting)


def _local_steps_and_reductions(spec: DTensorSpec, steps):
    """Split a plan into local steps (leaving Replicate: a chunk or a partition) and all-reduces (Partial ->
    Replicate), or None if it has any other step. The two kinds act on different mesh dims and commute (an
    all-reduce is elementwise), so the local steps may run first and the all-reduces be bucketed."""
    local, reductions = [], []
    for mesh_dim, new in steps:
        old = spec.placements[mesh_dim]
        if old.is_replicate():
            local.append((mesh_dim, new))
        elif old.is_partial() and new.is_replicate():
            reductions.append((mesh_dim, old.reduce_op))
        else:
            return None
    return local, reductions


def _single_collective(spec: DTensorSpec, steps):
    """The bucket key part of a plan that is one all-gather (Shard(d) -> Replicate) or one reduce-scatter
    (Partial -> Shard(d)) on a mesh dim of more than one rank, the latter possibly with all-reduces (Partial ->
    Replicate) on other mesh dims, which commute with it (elementwise sums over ranks holding equal chunks):
    ("all_gather", mesh_dim, d) or ("reduce_scatter", mesh_dim, d, reductions, reduce_op); None otherwise."""
    steps = [(k, new) for k, new in steps if spec.mesh.shape[k] > 1]  # single-rank steps move nothing
    if not steps or spec.dtype == torch.bool:
        return None
    main = [(k, new) for k, new in steps if not (spec.placements[k].is_partial() and new.is_replicate())]
    if len(main) != 1:
        return None
    mesh_dim, new = main[0]
    old = spec.placements[mesh_dim]
    if isinstance(old, Shard) and new.is_replicate() and len(steps) == 1:
        return ("all_gather", mesh_dim, old.normalized(spec.ndim).dim)
    if old.is_partial() and isinstance(new, Shard):
        reductions = tuple((k, spec.placements[k].reduce_op) for k, _ in steps if k != mesh_dim)
        return ("reduce_scatter", mesh_dim, new.normalized(spec.ndim).dim, reductions, old.reduce_op)  # op last
    return None


class _Together:
    """The buckets of one ``redistribute_together`` call: per-tensor results so far and the pending groups."""

    def __init__(self, count: int):
        self.results: list = [None] * count
        self.reductions = Buckets()  # (mesh, dtype, all-reduces) -> member indices
        # (mesh, dtype, kind, mesh_dim, [c10d op]) -> [(index, dim, size or (all-reduces after, reduce_op))]
        self.collectives = Buckets()

    def flush_reductions(self) -> None:
        for (mesh, _, reductions), members in self.reductions.drain():
            self._store(members, all_reduce_flat([self.results[i] for i in members], mesh, reductions))

    def issue(self, async_op: bool) -> list:
        """Run every bucket's collective, or with ``async_op`` start it: [(member indices, pending collective,
        what runs after it: the all-reduces on other mesh dims that follow a reduce-scatter, or None)]."""
        pending = []
        for (mesh, _dtype, kind, mesh_dim, *rest), members in self.collectives.drain():
            index, dims, sizes = zip(*members)
            tensors = [self.results[i] for i in index]
            if kind == "reduce_scatter":  # here ``sizes`` holds each member's (all-reduces after, reduce op)
                ops, after = [op for _, op in sizes], [reductions for reductions, _ in sizes]
                if async_op:
                    handle = collectives.reduce_scatter_flat(tensors, mesh, mesh_dim, dims, ops, async_op=True)
                    pending.append((index, handle, lambda index=index, after=after, mesh=mesh: self._all_reduce_after(index, after, mesh)))
                    continue
                self._store(index, collectives.reduce_scatter_flat(tensors, mesh, mesh_dim, dims, ops))
                self._all_reduce_after(index, after, mesh)
            elif async_op:
                pending.append((index, collectives.all_gather_flat(tensors, mesh, mesh_dim, dims, sizes, async_op=True), None))
            else:
                self._store(index, collectives.all_gather_flat(tensors, mesh, mesh_dim, dims, sizes))
        return pending

    def _all_reduce_after(self, index, reductions, mesh) -> None:
        """The all-reduces on other mesh dims that follow a bucket's reduce-scatter: one flat buffer per kind."""
        by_kind: dict = {}
        for i, kind in zip(index, reductions):
            if kind:
                by_kind.setdefault(kind, []).append(i)
        for kind, members in by_kind.items():
            self._store(members, all_reduce_flat([self.results[i] for i in members], mesh, kind))

    def _store(self, index, tensors) -> None:
        for i, t in zip(index, tensors):
            self.results[i] = t


def _bucket(dtensors, targets) -> _Together:
    """Sort the moves into per-tensor ones (run here), all-reduce buckets and single-collective buckets."""
    together = _Together(len(dtensors))
    for i, (dt, dst) in enumerate(zip(dtensors, targets)):
        spec, dst = dt._spec, tuple(dst)
        steps = plan_redistribute(spec.placements, dst, spec.mesh.shape, spec.shape.numel(), spec.dtype.itemsize)
        inside = spec.mesh.get_coordinate() is not None
        single = _single_collective(spec, steps) if inside else None
        if single is not None:
            kind, mesh_dim, dim, *op = single
            if kind == "all_gather":
                key, extra = (spec.mesh, spec.dtype, kind, mesh_dim), _level_size(spec.shape, spec.mesh, spec.placements, mesh_dim, dim)
            else:  # sum and avg are one c10d SUM (avg divides after): one bucket
                reductions, reduce_op = op
                key, extra = (spec.mesh, spec.dtype, kind, mesh_dim, "sum" if reduce_op == "avg" else reduce_op), op
            together.collectives.add(key, (i, dim, extra))
            together.results[i] = dt._local_tensor
            continue
        split = _local_steps_and_reductions(spec, steps) if inside else None
        if not steps or split is None or not split[1]:
            together.results[i] = redistribute_local(dt._local_tensor, spec, dst)
            continue
        local, placements = dt._local_tensor, spec.placements
        for mesh_dim, new in split[0]:
            local = _apply_step(local, spec, placements, mesh_dim, new)
            placements = placements[:mesh_dim] + (new,) + placements[mesh_dim + 1 :]
        together.results[i] = local
        together.reductions.add((spec.mesh, spec.dtype, tuple(split[1])), i)
    return together


def redistribute_together(dtensors, targets) -> list[torch.Tensor]:
    """The local tensors of several DTensors moved to their ``targets``, like ``redistribute_local`` each.

    Moves bucket as DDP and FSDP do: one flat buffer and ONE collective per group of
      * all-reduces (Partial -> Replicate, after any local steps): per (mesh, dtype, reductions);
      * single all-gathers (Shard(d) -> Replicate on one mesh dim, d may differ, uneven shards padded as the
        per-tensor all-gather pads them, other mesh dims unchanged): per (mesh, dtype, mesh dim);
      * single reduce-scatters (Partial -> Shard(d) on one mesh dim, sum and avg together), each possibly
        followed by all-reduces on other mesh dims (bucketed too): per (mesh, dtype, mesh dim, c10d op).
    Other moves run one by one. Bytes equal the per-tensor moves' bytes. Every rank must pass the same list in
    the same order (the buckets are built from global metadata only)::

        wholes = redistribute_together(shards, [[Replicate()]] * len(shards))   # one all-gather
    """
    return _start_together(dtensors, targets, async_op=False).wait()


class _PendingTogether:
    """The moves of one ``redistribute_together_async`` call; ``wait()`` finishes its collectives."""

    def __init__(self, together: _Together, pending: list):
        self._together, self._pending = together, pending

    def wait(self) -> list[torch.Tensor]:
        for index, handle, after in self._pending:
            self._together._store(index, handle.wait())
            if after is not None:
                after()
        self._pending = []
        return self._together.results


def redistribute_together_async(dtensors, targets) -> _PendingTogether:
    """``redistribute_together`` whose all-gather and reduce-scatter buckets are left in flight (ZeRO-3's
    prefetch and its reduce-scatter overlapped with backward): the other moves run before it returns;
    ``.wait()`` finishes the collectives (then the all-reduces that follow a reduce-scatter on other mesh dims)
    and returns the list of local tensors."""
    return _start_together(dtensors, targets, async_op=True)


def _start_together(dtensors, targets, async_op: bool) -> _PendingTogether:
    together = _bucket(dtensors, targets)
    together.flush_reductions()
    return _PendingTogether(together, together.issue(async_op))

"""Advanced indexing: index.Tensor (``x[idx0, :, idx1]``) and index_put / index_put_ (``x[idx] = v``, and, with
accumulate=True, the backward of index.Tensor).

``indices`` holds one optional integer tensor per leading dim of self; they broadcast to a shape B. The indexed
dims are replaced in the result by B: in place of the first one when they are adjacent, in front otherwise;
every other dim of self passes through whole. index_put writes ``values`` (broadcast to that result's shape R)
into self. Per mesh dim:

    self                     indices            values           output         why
    Shard(d), d not indexed  Replicate          Shard(its dim    Shard(d's      each row along d is indexed
                                                of R) or Repl.   place)         on its own
    index.Tensor:
    Replicate                Shard(e) where of  -                Shard(e's      the index entries are
                             size B[e], else R                   place in B)    independent
    Shard(d), d indexed      Replicate          -                Partial(sum)   each rank picks the entries in
      (not bool)                                                                its block, zeros elsewhere
    Partial(r)               Replicate          -                Partial(r)     a selection
    index_put:
    Shard(d), d indexed,     Replicate          Replicate        Shard(d)       each rank adds the entries
      accumulate=True                                                           that land in its block
    Partial(r) jointly with values, indices     Partial(r)       Partial(r)     overwrite: any r; accumulate:
                             Replicate                                          sum (avg on floating dtypes)
    anything else            Replicate                                          Replicate

A bool index (a mask) selects a data-dependent count of entries: only the first row (a dim it does not index)
is kept; index.Tensor with a mask has no meta shape at all, so the dispatcher gathers it before any rule.
"""

from __future__ import annotations

import torch

from dtensor_plus.placements import Partial, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import DTensorSpec

from .common import aten, replicate_all, replicated

_ANY = ("sum", "avg", "max", "min")


class _Geometry:
    """Where self's dims and the index dims land in the result of ``self[indices]`` (global metadata only).
    ``supported`` is False for what this file does not place (a mask beside other indices)."""

    def __init__(self, shape: tuple[int, ...], indices: list):
        tensors = [t for t in indices if t is not None]
        self.masks = any(t.dtype == torch.bool for t in tensors)
        self.supported = not self.masks or len(tensors) == 1
        self.indexed, at = [], 0
        for t in indices:  # a mask covers as many dims of self as it has
            width = t.ndim if t is not None and t.dtype == torch.bool else 1
            self.indexed += list(range(at, at + width)) if t is not None else []
            at += width
        self.b_shape = () if self.masks else tuple(torch.broadcast_shapes(*[t.shape for t in tensors]))
        num_b = 1 if self.masks else len(self.b_shape)  # a mask's count of entries is one dim
        adjacent = self.indexed[-1] - self.indexed[0] + 1 == len(self.indexed)
        self.first = self.indexed[0] if adjacent else 0  # where B goes
        rest = [d for d in range(len(shape)) if d not in self.indexed]
        if adjacent:
            self.place = {d: d if d < self.first else d - len(self.indexed) + num_b for d in rest}
        else:
            self.place = {d: num_b + k for k, d in enumerate(rest)}
        self.result_ndim = len(rest) + num_b

    def index_dim(self, spec: DTensorSpec, e: int) -> int:
        """The dim of B that dim ``e`` of an index tensor broadcasts along."""
        return e + len(self.b_shape) - spec.ndim


def _parts(op: OpSchema):
    """(self spec, the index tensors' specs, their geometry), or None where some tensor is not a DTensor or
    the geometry is one this file does not place."""
    x, indices = op.arg("self"), list(op.arg("indices"))
    tensors = [t for t in indices if t is not None]
    if not isinstance(x, DTensorSpec) or not all(isinstance(t, DTensorSpec) for t in tensors) or not tensors:
        return None
    geo = _Geometry(x.shape, indices)
    return (x, tensors, geo) if geo.supported else None


@register_rule(aten.index.Tensor)
def index_rule(op: OpSchema) -> Sharding:
    parts = _parts(op)
    if parts is None:
        return replicate_all(op)
    x, tensors, geo = parts
    x_targets, index_targets, outputs, masked = [], [[] for _ in tensors], [], False
    for k in range(len(op.mesh_shape)):
        p = x.placements[k]
        owner = None if geo.masks else next((t for t in tensors if _spans(t, t.placements[k], geo)), None)
        if isinstance(p, Shard) and p.dim in geo.place:
            x_target, idx, out = p, [Replicate()] * len(tensors), Shard(geo.place[p.dim])
        elif owner is not None:  # every index tensor spanning that dim of B is sliced alike; size-1 ones broadcast
            b = geo.index_dim(owner, owner.placements[k].dim)
            idx = [Shard(b - len(geo.b_shape) + t.ndim) if _spans(t, Shard(b - len(geo.b_shape) + t.ndim), geo)
                   else Replicate() for t in tensors]
            x_target, out = Replicate(), Shard(geo.first + b)
        elif isinstance(p, Shard) and not geo.masks and x.dtype != torch.bool:
            x_target, idx, out, masked = p, [Replicate()] * len(tensors), Partial("sum"), True
        elif p.is_partial():
            x_target, idx, out = p, [Replicate()] * len(tensors), p
        else:
            x_target, idx, out = Replicate(), [Replicate()] * len(tensors), Replicate()
        x_targets.append(x_target)
        outputs.append(out)
        for targets, t in zip(index_targets, idx):
            targets.append(t)
    # each index tensor by its place in the ``indices`` list (None entries index nothing)
    index_names = [("indices", i) for i, t in enumerate(op.arg("indices")) if t is not None]
    inputs = {"self": tuple(x_targets), **{name: tuple(t) for name, t in zip(index_names, index_targets)}}
    local_op = _masked(x.with_placements(x_targets), geo, accumulate=None) if masked else None
    return Sharding(inputs=inputs, outputs=(tuple(outputs),), local_op=local_op)


@register_rule(aten.index_put.default, aten.index_put_.default)
def index_put_rule(op: OpSchema) -> Sharding:
    parts = _parts(op)
    values = op.arg("values")
    if parts is None or not isinstance(values, DTensorSpec):
        return replicate_all(op)
    x, tensors, geo = parts
    accumulate = bool(op.arg("accumulate", False))
    floating = x.dtype.is_floating_point or x.dtype.is_complex
    linear = (("sum", "avg") if floating else ("sum",)) if accumulate else _ANY
    x_targets, v_targets, masked = [], [], False
    for k in range(len(op.mesh_shape)):
        p, q = x.placements[k], values.placements[k]
        if isinstance(p, Shard) and p.dim in geo.place:
            vd = geo.place[p.dim] - geo.result_ndim + values.ndim  # values broadcast from the right
            whole = vd >= 0 and values.shape[vd] == x.shape[p.dim]
            x_target, v_target = p, Shard(vd) if whole else Replicate()
        elif isinstance(p, Shard) and accumulate and not geo.masks and x.dtype != torch.bool:
            x_target, v_target, masked = p, Replicate(), True
        elif _joint_partial(p, q, linear) is not None:
            x_target = v_target = _joint_partial(p, q, linear)
        else:
            x_target = v_target = Replicate()
        x_targets.append(x_target)
        v_targets.append(v_target)
    inputs = {"self": tuple(x_targets), "indices": replicated(len(op.mesh_shape)), "values": tuple(v_targets)}
    local_op = _masked(x.with_placements(x_targets), geo, accumulate=op.func) if masked else None
    return Sharding(inputs=inputs, outputs=(tuple(x_targets),), local_op=local_op)


def _spans(t: DTensorSpec, p, geo: _Geometry) -> bool:
    """Is ``p`` a Shard of a dim of index tensor ``t`` as long as the dim of B it broadcasts along?"""
    return isinstance(p, Shard) and 0 <= p.dim < t.ndim and t.shape[p.dim] == geo.b_shape[geo.index_dim(t, p.dim)]


def _joint_partial(p, q, linear) -> Partial | None:
    """The Partial kept for (self, values) on one mesh dim: one kind r in ``linear`` among them, the others
    Replicate (partitioned for free)."""
    kinds = {z.reduce_op for z in (p, q) if z.is_partial()}
    if len(kinds) == 1 and kinds <= set(linear) and all(z.is_partial() or z.is_replicate() for z in (p, q)):
        return Partial(kinds.pop())
    return None


def _masked(x_target: DTensorSpec, geo: _Geometry, accumulate):
    """index (``accumulate`` None) or index_put (``accumulate`` the op, accumulate=True) on this rank's block of
    the indexed dims self is sharded along: indices shifted by the block's offset; entries outside the block
    read as zero (index: Partial(sum)) or add zero (index_put)."""
    sharded = sorted({p.dim for p in x_target.placements if isinstance(p, Shard)} & set(geo.indexed))

    def localise(x, indices):
        sizes, offsets = x_target.local_shape_and_offset()
        indices = list(indices)
        b_local = tuple(torch.broadcast_shapes(*[t.shape for t in indices if t is not None]))  # index shards
        inside = torch.ones(b_local, dtype=torch.bool, device=x.device)
        for d in sharded:
            whole = x_target.shape[d]
            local = torch.where(indices[d] < 0, indices[d] + whole, indices[d]) - offsets[d]
            inside = inside & (local >= 0) & (local < sizes[d])
            indices[d] = local.clamp(0, max(sizes[d] - 1, 0))
        # where B sits in the result, as a broadcastable view of ``inside``
        view = (1,) * geo.first + b_local + (1,) * (geo.result_ndim - geo.first - len(b_local))
        return indices, inside.view(view), any(sizes[d] == 0 for d in sharded)

    def index_local(x, indices):
        indices, inside, empty = localise(x, indices)
        if empty:  # read from a block of zeros of size 1 there instead: the right shape, all masked off
            x = x.new_zeros([max(s, 1) for s in x.shape])
        out = aten.index.Tensor(x, indices)
        return torch.where(inside, out, torch.zeros((), dtype=out.dtype, device=out.device))

    def index_put_local(x, indices, values, accumulate_=True):
        indices, inside, empty = localise(x, indices)
        if empty:
            return x if accumulate is aten.index_put_.default else x.clone()
        shape = list(x.shape[:geo.first]) + list(geo.b_shape) + [x.shape[d] for d in sorted(geo.place)][geo.first:]
        values = torch.where(inside, values.expand(shape), torch.zeros((), dtype=values.dtype, device=values.device))
        return accumulate(x, indices, values, True)

    return index_local if accumulate is None else index_put_local

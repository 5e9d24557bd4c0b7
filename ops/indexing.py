"""Gather and scatter: gather, scatter (src / value / reduce forms), scatter_add, scatter_reduce, index_copy,
index_fill, index_reduce (and the in-place forms). index_select and index_add live in ``views.py``.

These ops are *rowwise* along every dim d other than ``dim``: output row i (along d) reads row i of each
input, and the index values only address ``dim``, which stays whole on every rank. One tensor is the
*anchor*, whose shape the output has (``index`` for gather, ``self`` for the others). Per mesh dim:

    anchor                   other tensors (index, src, source)          output
    Shard(d), d != dim       Shard(d) if the same size along d as the    Shard(d)
                             anchor, else Replicate, narrowed locally
                             to the anchor's rows (a shorter index or
                             src: rows past its end are untouched)
    Shard(dim), gather only  Replicate (self whole along dim)            Shard(dim): index rows are independent
    Replicate, some other    (the anchor is sliced for free)             Shard(d)
      input Shard(d) of the anchor's size along d, d != dim
    Partial(r) (or Replicate with a Partial(r) partner), index Replicate: kept where the op commutes with r:
      gather (a selection): any r
      scatter.src, index_copy (self written over by a selection of src, jointly): any r
      scatter.value, index_fill (a constant written): avg, max, min (a sum would add it n times)
      scatter_add, scatter(reduce='add'), scatter_reduce / index_reduce sum | mean (linear jointly in
        self, src): sum, and avg on floating dtypes; amax | amin: max | min
    anything else            Replicate                                   Replicate

A shard of ``dim`` itself is gathered for the scatters. gather takes it as it is when the index is
Replicate there: each rank gathers the indices that fall in its block (zeros for the others), and the output
is Partial(sum), the sum being exact (one nonzero term per entry).
"""

from __future__ import annotations

from typing import Callable

import torch

from dtensor_plus.placements import Partial, Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import DTensorSpec

from .common import aten, normalize_dim, replicate_all

_ANY = ("sum", "avg", "max", "min")


def _mirrors(other: DTensorSpec, anchor: DTensorSpec, d: int, dim: int) -> bool:
    """May ``other`` take the anchor's Shard(d): same rank, d is not the indexed dim, same size along d."""
    return other.ndim == anchor.ndim and d != dim and other.shape[d] == anchor.shape[d]


def _anchor_shard(anchor: DTensorSpec, others, mesh_dim: int, dim: int, may_shard_dim: bool) -> Placement | None:
    p = anchor.placements[mesh_dim]
    if isinstance(p, Shard) and (p.dim != dim or may_shard_dim):
        return p
    for spec in others:  # the anchor is sliced for free where it is Replicate
        q = spec.placements[mesh_dim]
        if isinstance(q, Shard) and q.dim < anchor.ndim and _mirrors(spec, anchor, q.dim, dim):
            return q
    return None


def _partial(placements: list[Placement], linear: tuple[str, ...]) -> Partial | None:
    """The Partial kept on one mesh dim: every Partial among the linear inputs has the same kind r, in
    ``linear``; the Replicate ones are partitioned for free."""
    kinds = {p.reduce_op for p in placements if p.is_partial()}
    if len(kinds) == 1 and kinds <= set(linear) and all(p.is_partial() or p.is_replicate() for p in placements):
        return Partial(kinds.pop())
    return None


def _rowwise(op: OpSchema, anchor_key: str, dim: int, linear_keys, linear: tuple[str, ...],
             may_shard_dim: bool = False, masked: bool = False) -> Sharding:
    """The table above, over the DTensor arguments by name (self, index, and src, source or value).
    ``linear_keys``: the arguments that may stay Partial together (with r in ``linear``); ``masked`` (gather):
    self Shard(dim) with the index Replicate gives a masked local gather, Partial(sum)."""
    tensors = list(zip(op.names, op.specs))
    if anchor_key not in dict(tensors):  # a plain 0-d anchor beside a DTensor: nothing to split
        return replicate_all(op)
    anchor = dict(tensors)[anchor_key]
    others = [spec for key, spec in tensors if key != anchor_key]
    targets = {key: [] for key, _ in tensors}
    output = []
    masked_mesh_dims = []
    for mesh_dim in range(len(op.mesh_shape)):
        shard = _anchor_shard(anchor, others, mesh_dim, dim, may_shard_dim)
        if shard is None and masked and _masks(dict(tensors), mesh_dim, dim):
            targets[_SELF].append(Shard(dim))
            targets[_INDEX].append(Replicate())
            output.append(Partial())
            masked_mesh_dims.append(mesh_dim)
            continue
        partial = None
        if shard is None:
            linear_now = [spec.placements[mesh_dim] for key, spec in tensors if key in linear_keys]
            rest_replicate = all(spec.placements[mesh_dim].is_replicate() or key in linear_keys
                                 for key, spec in tensors)
            partial = _partial(linear_now, linear) if rest_replicate else None
        for key, spec in tensors:
            if shard is not None:
                mirror = key == anchor_key or _mirrors(spec, anchor, shard.dim, dim)
                targets[key].append(shard if mirror else Replicate())
            elif partial is not None and key in linear_keys:
                targets[key].append(partial)
            else:
                targets[key].append(Replicate())
        output.append(shard or partial or Replicate())
    anchor_target = anchor.with_placements(targets[anchor_key])
    narrow = {key: _narrow_dims(spec, anchor_target, dim) for key, spec in tensors if key != anchor_key}
    # The local op finds each argument to narrow where the call passed it: by position, or by keyword.
    narrow = {(op.record.arg_names.index(key), key): dims for key, dims in narrow.items() if dims}
    inputs = {key: tuple(placements) for key, placements in targets.items()}
    func = _masked_gather(dict(tensors)[_SELF].with_placements(targets[_SELF]), dim) if masked_mesh_dims else op.func
    local_op = _narrowing(func, narrow, anchor_target) if narrow else func if masked_mesh_dims else None
    return Sharding(inputs=inputs, outputs=(tuple(output),), local_op=local_op)


def _masks(tensors: dict, mesh_dim: int, dim: int) -> bool:
    """gather from a self sharded along ``dim`` with a replicated index: each rank picks the entries in its
    block, zeros elsewhere, and the sum over ranks is the gather (bool has no exact sum: gathered instead)."""
    spec, index = tensors.get(_SELF), tensors[_INDEX]
    return (spec is not None and spec.placements[mesh_dim].is_shard(dim) and index.placements[mesh_dim].is_replicate()
            and spec.dtype != torch.bool)


def _masked_gather(self_target: DTensorSpec, dim: int) -> Callable:
    """gather from this rank's block along ``dim`` (offset from the target layout): indices outside it give 0."""

    def local_op(x, dim_, index, **kwargs):
        sizes, offsets = self_target.local_shape_and_offset()
        local = index - offsets[dim]
        inside = (local >= 0) & (local < sizes[dim])
        if sizes[dim] == 0:
            return torch.zeros(index.shape, dtype=x.dtype, device=x.device)
        out = aten.gather.default(x, dim_, local.clamp(0, sizes[dim] - 1), **kwargs)
        return torch.where(inside, out, torch.zeros((), dtype=out.dtype, device=out.device))

    return local_op


def _narrow_dims(spec: DTensorSpec, anchor_target: DTensorSpec, dim: int) -> list[tuple[int, int]]:
    """(d, size of ``spec`` along d) for each dim the anchor shards that ``spec`` holds whole: the local op
    narrows it to the anchor's rows."""
    if spec.ndim != anchor_target.ndim:  # index_copy's 1-d index, index_fill's 0-d value: they address dim only
        return []
    dims = {p.dim for p in anchor_target.placements if isinstance(p, Shard)} - {dim}
    return [(d, spec.shape[d]) for d in sorted(dims) if not _mirrors(spec, anchor_target, d, dim)]


def _narrowing(func, narrow: dict, anchor_target: DTensorSpec) -> Callable:
    """``func`` with each whole input in ``narrow`` cut to the anchor block's rows (clipped to its size)."""

    def local_op(*args, **kwargs):
        sizes, offsets = anchor_target.local_shape_and_offset()
        args = list(args)
        for (position, name), dims in narrow.items():
            tensor = args[position] if position < len(args) else kwargs[name]
            for d, size in dims:
                start = min(offsets[d], size)
                tensor = tensor.narrow(d, start, min(offsets[d] + sizes[d], size) - start)
            if position < len(args):
                args[position] = tensor
            else:
                kwargs[name] = tensor
        return func(*args, **kwargs)

    return local_op


# -- registrations --------------------------------------------------------------------------------------

_SELF, _INDEX, _SRC, _SOURCE, _VALUE = "self", "index", "src", "source", "value"

_SCATTER_SRC = (aten.scatter.src, aten.scatter_.src)
_SCATTER_VALUE = (aten.scatter.value, aten.scatter_.value)
_SCATTER_REDUCE = (aten.scatter.reduce, aten.scatter_.reduce, aten.scatter.value_reduce, aten.scatter_.value_reduce)
_SCATTER_ADD = (aten.scatter_add.default, aten.scatter_add_.default)
_SCATTER_REDUCE_TWO = (aten.scatter_reduce.two, aten.scatter_reduce_.two)
_INDEX_COPY = (aten.index_copy.default, aten.index_copy_.default)
_INDEX_REDUCE = (aten.index_reduce.default, aten.index_reduce_.default)
_INDEX_FILL = (aten.index_fill.int_Scalar, aten.index_fill_.int_Scalar, aten.index_fill.int_Tensor,
               aten.index_fill_.int_Tensor)


def _dim(op: OpSchema) -> int:
    return normalize_dim(op.arg("dim"), op.arg("self").ndim)  # self: a spec, or a plain 0-d tensor


def _additive(op: OpSchema) -> tuple[str, ...]:
    """sum, and avg where the values are floating (an integer avg floors each piece)."""
    spec = op.arg("self")
    return ("sum", "avg") if spec.dtype.is_floating_point or spec.dtype.is_complex else ("sum",)


@register_rule(aten.gather.default)
def gather_rule(op: OpSchema) -> Sharding:
    """gather(self, dim, index): the output has the index's shape; a selection, so any Partial of self passes;
    self sharded along dim with the index replicated: masked local gathers, Partial(sum) (loss parallel's pick
    of the target logits from vocab-sharded logits)."""
    return _rowwise(op, _INDEX, _dim(op), (_SELF,), _ANY, may_shard_dim=True, masked=True)


@register_rule(*_SCATTER_SRC, *_INDEX_COPY)
def scatter_src_rule(op: OpSchema) -> Sharding:
    """self written over by a selection of src (an index copy): any Partial kind of both passes."""
    return _rowwise(op, _SELF, _dim(op), (_SELF, _SRC, _SOURCE), _ANY)


@register_rule(*_SCATTER_VALUE, *_INDEX_FILL)
def scatter_value_rule(op: OpSchema) -> Sharding:
    """A constant written: avg, max and min of self pass (a sum would count the constant n times)."""
    return _rowwise(op, _SELF, _dim(op), (_SELF, _VALUE), ("avg", "max", "min"))


@register_rule(*_SCATTER_ADD)
def scatter_add_rule(op: OpSchema) -> Sharding:
    return _rowwise(op, _SELF, _dim(op), (_SELF, _SRC), _additive(op))


@register_rule(*_SCATTER_REDUCE)
def scatter_reduce_legacy_rule(op: OpSchema) -> Sharding:
    """scatter(..., reduce='add' | 'multiply'): 'add' is scatter_add; 'multiply' keeps no Partial."""
    linear = _additive(op) if op.arg("reduce") == "add" else ()
    return _rowwise(op, _SELF, _dim(op), (_SELF, _SRC, _VALUE), linear)


_REDUCE_KEEPS = {"sum": None, "mean": None, "amax": ("max",), "amin": ("min",), "prod": ()}


@register_rule(*_SCATTER_REDUCE_TWO, *_INDEX_REDUCE)
def scatter_reduce_rule(op: OpSchema) -> Sharding:
    """scatter_reduce(self, dim, index, src, reduce, include_self) and index_reduce(self, dim, index, source,
    reduce, include_self): sum and mean are linear jointly in (self, src) (the mean's count depends on the
    index alone); amax | amin keep a Partial(max | min)."""
    reduce = op.arg("reduce")
    keeps = _REDUCE_KEEPS[reduce]
    if keeps is None:
        floating = op.arg("self").dtype.is_floating_point or op.arg("self").dtype.is_complex
        keeps = _additive(op) if reduce == "sum" or floating else ()  # an integer mean floors each piece
    return _rowwise(op, _SELF, _dim(op), (_SELF, _SRC, _SOURCE), keeps)

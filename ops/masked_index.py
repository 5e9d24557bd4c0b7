"""``_unsafe_masked_index(self, mask, indices, fill)`` and its backward ``_unsafe_masked_index_put_accumulate(self,
mask, indices, values)``: advanced indexing with clamped indices and a mask (torch's decompositions of
reflection/replication pads, interpolation, slice_scatter and embedding's backward build them).

    masked_index = where(mask, self[clamp(indices)], fill)
    put_accumulate = self.index_put(clamp(indices), values.masked_fill(~mask, 0), accumulate=True)

The non-None indices must be adjacent (else everything is gathered); they span the dims [first, last] of self,
and the result has self's leading dims, then the indices' broadcast shape B, then self's trailing dims. mask and
values broadcast against that result (right-aligned), the indices against B. An index names a row of its dim of
self; clamping maps it into [-size, size - 1] and a negative one wraps, as torch does. Per mesh dim:

    masked_index
    some input Shard of a result dim o      Shard(o): every input that spans o at full size takes the matching
      (self: a dim no index touches)        Shard, the others (size 1 there, or self when o is in B) Replicate
    else self Shard(d), d indexed           Partial(sum): each rank reads the rows of its block, 0 elsewhere; the
      (mask, indices Replicate)             fill is written by the coordinate-0 rank only (bool: gathered; other
                                            Partial kinds of self are reduced: the zeros survive sums only)
    self Partial(r)                         Partial(r): a selection; for sum the fill again goes to coordinate 0
    put_accumulate (a self sharded along an indexed dim comes first: it costs no traffic at all)
    self Shard(d), d not indexed            Shard(d): mask and values take the matching Shard where they span it
    self Shard(d), d indexed                Shard(d): each rank adds the values whose row falls in its block
                                            (mask, indices, values Replicate)
    values/mask/index Shard of a B dim      Partial(sum): self is partitioned (rank 0 keeps it), each rank adds
                                            its own part of the values (linear in values)
    self, values Partial(r), r sum | avg    Partial(r): linear jointly in (self, values)
    anything else                           Replicate
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dtensor_plus.placements import Partial, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import DTensorSpec, TensorMeta

from .common import aten, meta_outputs, replicate_all
from .flat_indexing import local_block
from .indexing import _partial


class _Geometry:
    """Where each input's dims land in the result (all global metadata)."""

    def __init__(self, spec: DTensorSpec, indices: list):
        present = [d for d, t in enumerate(indices) if t is not None]
        self.first, self.last = present[0], present[-1]
        self.adjacent = present == list(range(self.first, self.last + 1))
        self.shape = tuple(spec.shape)
        self.b_shape = tuple(torch.broadcast_shapes(*(tuple(indices[d].shape) for d in present)))
        self.num_trailing = spec.ndim - self.last - 1
        self.out_shape = self.shape[: self.first] + self.b_shape + self.shape[self.last + 1:]

    def self_to_out(self, d: int) -> int | None:
        if d < self.first:
            return d
        return None if d <= self.last else d - self.last - 1 + self.first + len(self.b_shape)

    def self_dim(self, o: int) -> int | None:
        return next((d for d in range(len(self.shape)) if self.self_to_out(d) == o), None)

    def aligned_dim(self, spec: DTensorSpec, o: int, within_b: bool = False) -> int | None:
        """``spec``'s dim that broadcasts against result dim ``o`` at full size (right-aligned to the result, or
        to B for an index), else None."""
        if within_b:
            if not self.first <= o < self.first + len(self.b_shape):
                return None
            dim, full = o - self.first - (len(self.b_shape) - spec.ndim), self.b_shape[o - self.first]
        else:
            dim, full = o - (len(self.out_shape) - spec.ndim), self.out_shape[o]
        return dim if dim >= 0 and spec.shape[dim] == full else None


def _parse(op: OpSchema, has_values: bool):
    """(self, mask, [index specs by position or None], values, geometry), or None when it is not handled."""
    spec, mask, indices = op.arg("self"), op.arg("mask"), list(op.arg("indices"))
    values = op.arg("values") if has_values else None
    tensors = [spec, mask, *[t for t in indices if t is not None]] + ([values] if has_values else [])
    if not all(isinstance(t, DTensorSpec) for t in tensors):  # a plain 0-d tensor among them
        return None
    if all(t is None for t in indices):
        return None
    geometry = _Geometry(spec, indices)
    return (spec, mask, indices, values, geometry) if geometry.adjacent else None


def _result_dim(p, spec, geometry, role):
    """The result dim that input ``spec``'s Shard ``p`` names, when it spans it at full size."""
    if not p.is_shard():
        return None
    if role == "self":
        return geometry.self_to_out(p.dim)
    out_ndim = len(geometry.out_shape)
    if role == "index":
        o = p.dim + len(geometry.b_shape) - spec.ndim + geometry.first
        return o if geometry.aligned_dim(spec, o, within_b=True) == p.dim else None
    o = p.dim + out_ndim - spec.ndim
    return o if geometry.aligned_dim(spec, o) == p.dim else None


def _follow(o, mask, indices, values, geometry, k):
    """Targets of mask, the indices, values on mesh dim ``k`` for a Shard of result dim ``o``."""
    def shard(spec, within_b=False):
        dim = geometry.aligned_dim(spec, o, within_b)
        return Replicate() if dim is None else Shard(dim)
    return (shard(mask), [shard(t, True) if t is not None else None for t in indices],
            shard(values) if values is not None else None)


class _Row(NamedTuple):
    """One mesh dim's decision: a placement per input (``indices``: one per index, None where absent) and for the
    output; ``kind`` is None, "masked" (self sharded along an indexed dim) or "sum-fill" (a Partial(sum) self)."""

    self: object
    mask: object
    indices: list
    values: object
    out: object
    kind: str | None


def _rows(op: OpSchema, parsed, accumulate: bool) -> list[_Row]:
    """One _Row per mesh dim (the table in the module docstring)."""
    spec, mask, indices, values, geometry = parsed
    roles = [(spec, "self"), (mask, "mask"), *[(t, "index") for t in indices if t is not None]]
    roles += [(values, "values")] if values is not None else []
    summable = spec.dtype != torch.bool
    R = Replicate()
    rows = []
    for k in range(len(op.mesh_shape)):
        found = [_result_dim(t.placements[k], t, geometry, role) for t, role in roles]
        kept = next((o for o in found if o is not None), None)
        p = spec.placements[k]
        # self sharded along an indexed dim: a masked read (kept only where no input gives a Shard of the
        # result, as a Partial costs a reduction later) or a masked accumulate (always: no traffic at all)
        if p.is_shard() and geometry.self_to_out(p.dim) is None and (accumulate or (summable and kept is None)):
            out = p if accumulate else Partial()
            rows.append(_Row(p, R, [R if t is not None else None for t in indices], R if values else None, out, "masked"))
            continue
        if kept is not None and (not accumulate or geometry.self_dim(kept) is not None or summable):
            m, idx, v = _follow(kept, mask, indices, values, geometry, k)
            self_dim = geometry.self_dim(kept)
            if self_dim is not None:
                rows.append(_Row(Shard(self_dim), m, idx, v, Shard(self_dim), None))
            elif not accumulate:
                rows.append(_Row(R, m, idx, v, Shard(kept), None))
            elif p in (R, Partial()):
                rows.append(_Row(Partial(), m, idx, v, Partial(), None))
            else:
                rows.append(_Row(R, R, [R if t is not None else None for t in indices], R, R, None))
            continue
        plain = [R if t is not None else None for t in indices]
        if accumulate:
            floating = spec.dtype.is_floating_point or spec.dtype.is_complex
            r = _partial([p, values.placements[k]], ("sum", "avg") if floating else ("sum",))
            rows.append(_Row(r, R, plain, r, r, None) if r else _Row(R, R, plain, R, R, None))
        elif p.is_partial() and p.reduce_op != "product":  # values put on every rank would multiply n times
            rows.append(_Row(p, R, plain, None, p, "sum-fill" if p.reduce_op == "sum" else None))
        else:
            rows.append(_Row(R, R, plain, None, R, None))
    if any(row.kind == "masked" for row in rows) and not accumulate:  # its zeros survive sums only
        for k, row in enumerate(rows):
            if row.out.is_partial() and row.out.reduce_op != "sum":
                rows[k] = row._replace(self=R, out=R, kind=None)
    return rows


def _sharding(op, parsed, rows, local_op):
    spec, mask, indices, values, _ = parsed
    inputs = {"self": tuple(row.self for row in rows), "mask": tuple(row.mask for row in rows)}
    for position, t in enumerate(indices):
        if t is not None:  # an element of the list argument: named (name, position)
            inputs[("indices", position)] = tuple(row.indices[position] for row in rows)
    if values is not None:
        inputs["values"] = tuple(row.values for row in rows)
    return Sharding(inputs=inputs, outputs=(tuple(row.out for row in rows),), local_op=local_op)


def _localize(self_target, geometry, indices, mesh_dims):
    """This rank's indices into its block of self, and where the result reads a row inside it (shaped to
    broadcast against the result)."""
    sizes, offsets = local_block(self_target)
    dims = {p.dim for k, p in enumerate(self_target.placements) if k in mesh_dims}
    inside = torch.ones((), dtype=torch.bool, device=next(t for t in indices if t is not None).device)
    local = list(indices)
    for d in sorted(dims):
        size = geometry.shape[d]
        row = indices[d].clamp(-size, size - 1)
        row = torch.where(row < 0, row + size, row)
        inside = inside & (row >= offsets[d]) & (row < offsets[d] + sizes[d])
        local[d] = (row - offsets[d]).clamp(0, max(sizes[d] - 1, 0))
    return local, inside.reshape(tuple(inside.shape) + (1,) * geometry.num_trailing)


@register_rule(aten._unsafe_masked_index.default)
def masked_index_rule(op: OpSchema) -> Sharding:
    parsed = _parse(op, has_values=False)
    if parsed is None:
        return replicate_all(op)
    rows = _rows(op, parsed, accumulate=False)
    masked = [k for k, row in enumerate(rows) if row.kind == "masked"]
    fill_mesh_dims = [k for k, row in enumerate(rows) if row.kind is not None]
    if not fill_mesh_dims and not any(row.self.is_shard() for row in rows):
        return _sharding(op, parsed, rows, None)
    spec, geometry, mesh = parsed[0], parsed[4], parsed[0].mesh
    self_target = spec.with_placements(tuple(row.self for row in rows))
    out_target = DTensorSpec(mesh, tuple(row.out for row in rows), TensorMeta.of(meta_outputs(op)[0]))

    def masked_index(x, mask, indices, fill):
        coordinate = mesh.get_coordinate()
        if coordinate is not None and any(coordinate[k] for k in fill_mesh_dims):
            fill = 0  # Partial(sum): one rank writes the fill
        if x.numel() == 0:  # torch's kernel gets an empty self's result shape wrong: take it from the layout
            value = x.new_zeros(local_block(out_target)[0])
        elif masked:
            local, inside = _localize(self_target, geometry, indices, masked)
            value = aten._unsafe_masked_index.default(x, mask & inside, local, 0)
        else:
            return aten._unsafe_masked_index.default(x, mask, indices, fill)
        return torch.where(mask, value, torch.tensor(fill, dtype=value.dtype, device=value.device))

    return _sharding(op, parsed, rows, masked_index)


@register_rule(aten._unsafe_masked_index_put_accumulate.default)
def masked_index_put_accumulate_rule(op: OpSchema) -> Sharding:
    parsed = _parse(op, has_values=True)
    if parsed is None:
        return replicate_all(op)
    rows = _rows(op, parsed, accumulate=True)
    masked = [k for k, row in enumerate(rows) if row.kind == "masked"]
    if not masked:
        return _sharding(op, parsed, rows, None)
    spec, geometry = parsed[0], parsed[4]
    self_target = spec.with_placements(tuple(row.self for row in rows))

    def masked_put_accumulate(x, mask, indices, values):
        local, inside = _localize(self_target, geometry, indices, masked)
        return aten._unsafe_masked_index_put_accumulate.default(x, mask & inside, local, values)

    return _sharding(op, parsed, rows, masked_put_accumulate)

"""Scatters into a slice or a selected index: ``select_scatter`` and ``slice_scatter`` (functionalised
in-place writes such as ``x[:, 2] = v`` and ``x[1:5] = v``).

Per mesh dim, with ``dim`` the dim written into:

    self Shard(d), d != dim       src Shard of the matching dim; output Shard(d), no traffic
    self Shard(dim)               stays: src is Replicate on that mesh dim and each rank writes the part of it
                                  that falls into its own block (select: only the owner of ``index`` writes;
                                  slice: the slice elements inside the block, ``view_algebra.local_slice``)
    self Replicate, src Shard     self follows src's dim (chunking a Replicate is free)
    Partial                       kept where self and src share it (or one is Replicate, partitioned into it):
                                  the write is linear in (self, src) together; otherwise reduced

The rank-dependent part (which block a rank holds) is read at run time from the mesh coordinate; every
decision is made from global metadata.
"""

from __future__ import annotations

from dtensor_plus.placements import Replicate
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, normalize_dim, replicated
from .diagonals import scatter_placements
from .shape_ops import block
from .view_algebra import local_slice, slice_range


def _scatter_sharding(op: OpSchema, dim: int, self_to_src: dict[int, int]):
    """(input targets by name, self target, output placements): ``scatter_placements`` per mesh dim, except that
    a Shard of ``dim`` itself stays (with src whole on that mesh dim)."""
    spec, src = op.spec("self"), op.spec("src")  # src None: a plain 0-d tensor, whole on every rank
    src_placements = src.placements if src is not None else replicated(len(op.mesh_shape))
    rows = []
    for p, q in zip(spec.placements, src_placements):
        if p.is_shard(dim):
            q = Replicate() if q.is_shard() or q.is_partial() else q
            rows.append((p, q, p))
        else:
            rows.append(scatter_placements(p, q, self_to_src))
    self_t, src_t, output = (tuple(column) for column in zip(*rows))
    inputs = {"self": self_t, "src": src_t} if src is not None else {"self": self_t}
    return inputs, self_t, output


@register_rule(aten.select_scatter.default)
def select_scatter_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    dim = normalize_dim(op.arg("dim"), spec.ndim)
    inputs, self_t, output = _scatter_sharding(op, dim, {d: d - (d > dim) for d in range(spec.ndim) if d != dim})
    if not any(p.is_shard(dim) for p in self_t):
        return Sharding(inputs=inputs, outputs=(output,))
    index = op.arg("index")
    index += spec.shape[dim] if index < 0 else 0
    shape, mesh = spec.shape, spec.mesh

    def select_scatter_owned(x, src, *args, **kwargs):
        offset, length = block(shape, mesh, self_t, dim)
        if offset <= index < offset + length:
            return aten.select_scatter.default(x, src, dim, index - offset)
        return x.clone()

    return Sharding(inputs=inputs, outputs=(output,), local_op=select_scatter_owned)


@register_rule(aten.slice_scatter.default)
def slice_scatter_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    dim = normalize_dim(op.arg("dim", 0), spec.ndim)
    inputs, self_t, output = _scatter_sharding(op, dim, {d: d for d in range(spec.ndim) if d != dim})
    if not any(p.is_shard(dim) for p in self_t):
        return Sharding(inputs=inputs, outputs=(output,))
    step = op.arg("step", 1)
    start, length = slice_range(spec.shape[dim], op.arg("start"), op.arg("end"), step)
    shape, mesh = spec.shape, spec.mesh

    def slice_scatter_owned(x, src, *args, **kwargs):
        offset, size = block(shape, mesh, self_t, dim)
        lo, hi, count = local_slice((offset, size), start, step, length)
        if count == 0:
            return x.clone()
        first = (lo + offset - start) // step  # the slice position of this block's first element
        return aten.slice_scatter.default(x, src.narrow(dim, first, count), dim, lo, hi, step)

    return Sharding(inputs=inputs, outputs=(output,), local_op=slice_scatter_owned)

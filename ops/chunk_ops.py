"""Copies of pieces of tensors: narrow_copy (a copied slice) and _chunk_cat (a cat of chunks).

Per mesh dim, by the input placement there:

    narrow_copy(x, dim, start, length)    as slice (views.py): Shard(dim) kept where each rank's part of the
                                          narrowed range is its torch.chunk block of the result (a local
                                          narrow at its offset), else gathered; other Shards kept;
                                          Partial passes (elements are only copied)
    _chunk_cat(tensors, dim, n)           each input is split into n chunks along dim (zero padded), and chunk
                                          i of every input is flattened and joined into row i of the output
                                          (shape: leading dims, n, sum of chunk sizes). A Shard of a leading
                                          dim d < dim (which every input shares) is kept on every input and the
                                          output; a Partial all inputs agree on passes (zero padding is
                                          linear; avg only for floating values, as integer avg
                                          floors); dims >= dim are gathered

The backward of narrow_copy is slice_backward (its own rule); _chunk_cat has no derivative in torch.
"""

from __future__ import annotations

import math

from dtensor_plus.placements import Partial, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import local_shape_and_offset

from .common import aten, normalize_dim
from .view_algebra import local_slice, propagate, slice_range, sliced_out_dims


def _local_narrow(shape, mesh, placements, dim: int, start: int, length: int):
    """narrow_copy of this rank's part of [start, start + length) along a sharded ``dim``."""

    def local_op(x, *args, **kwargs):
        coordinate = mesh.get_coordinate()
        block = (0, 0)
        if coordinate is not None:  # a rank outside the mesh holds nothing
            sizes, offsets = local_shape_and_offset(shape, mesh.shape, placements, coordinate)
            block = (offsets[dim], sizes[dim])
        lo, _, count = local_slice(block, start, 1, length)
        return aten.narrow_copy.default(x, dim, lo, count)

    return local_op


@register_rule(aten.narrow_copy.default)
def narrow_copy_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    dim = normalize_dim(op.arg("dim"), spec.ndim)
    start, length = op.arg("start"), op.arg("length")
    start += spec.shape[dim] if start < 0 else 0  # narrow counts a negative start from the end
    start, length = slice_range(spec.shape[dim], start, start + length, 1)
    out_dims = sliced_out_dims(spec.placements, op.mesh_shape, spec.shape, dim, start, 1, length)
    inputs, outputs = propagate(spec.placements, out_dims)
    if not any(p.is_shard(dim) for p in inputs):
        return Sharding(inputs=(inputs,), outputs=(outputs,))
    return Sharding(inputs=(inputs,), outputs=(outputs,),
                    local_op=_local_narrow(spec.shape, spec.mesh, inputs, dim, start, length))


@register_rule(aten._chunk_cat.default)
def chunk_cat_rule(op: OpSchema) -> Sharding:
    specs = op.specs
    dim = normalize_dim(op.arg("dim"), specs[0].ndim)
    linear = {"sum", "avg"} if specs[0].dtype.is_floating_point or specs[0].dtype.is_complex else {"sum"}
    placements = []
    for mesh_dim in range(len(op.mesh_shape)):
        ps = [s.placements[mesh_dim] for s in specs]
        leading = [p for p in ps if isinstance(p, Shard) and p.dim < dim]
        reduce_ops = {p.reduce_op for p in ps if p.is_partial()}
        if leading:
            placements.append(leading[0])  # the leading dims are the same in every input: so are their blocks
        elif len(reduce_ops) == 1 and reduce_ops <= linear and all(p.is_partial() for p in ps):
            placements.append(Partial(reduce_ops.pop()))
        else:
            placements.append(Replicate())
    placements = tuple(placements)
    if not any(isinstance(p, Shard) for p in placements):
        return Sharding(inputs=(placements,) * len(specs), outputs=(placements,))
    return Sharding(inputs=(placements,) * len(specs), outputs=(placements,), local_op=_chunk_cat_or_empty)


def _chunk_cat_or_empty(tensors, dim, num_chunks):
    """_chunk_cat, except on a rank whose block of a sharded leading dim is empty (torch refuses empty
    inputs): there the empty output, whose row width comes from the unsharded trailing dims."""
    if all(t.numel() for t in tensors):
        return aten._chunk_cat.default(tensors, dim, num_chunks)
    dim = normalize_dim(dim, tensors[0].ndim)  # a negative dim comes only with inputs of one ndim
    width = sum(-(-t.shape[dim] // num_chunks) * math.prod(t.shape[dim + 1:]) for t in tensors)
    return tensors[0].new_zeros(tuple(tensors[0].shape[:dim]) + (num_chunks, width))

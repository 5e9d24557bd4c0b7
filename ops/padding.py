"""``constant_pad_nd``: padding (or cropping, for negative pads) with a constant, on sharded tensors.

``pad`` lists (left, right) pairs from the last dim backwards. Per mesh dim:

    Shard of an unpadded dim      stays, no traffic
    Shard of a padded dim d       stays where every rank's torch.chunk block of the padded dim is made of data
                                  from its own input block plus pad values only (``pad_aligns``, checked on
                                  every mesh coordinate, nested mesh dims outermost first): each rank narrows its
                                  block to the data it keeps and pads by its own amounts (so the pads land on the
                                  first / last ranks; a symmetric pad of an evenly split dim is the common case).
                                  Otherwise that mesh dim (and any inner one sharding d) is gathered
    Partial(sum)                  stays: the rank at coordinate 0 of the Partial(sum) mesh dims pads with
                                  ``value``, the others with 0, so the pads add up to ``value``
    Partial(avg|max|min)          stays: every rank pads with ``value``, which reduces to itself

The pad value enters the local op at run time (dispatch keys floats by type only, so no decision depends on it).
"""

from __future__ import annotations

import functools

from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten
from .shape_ops import block
from .view_algebra import aligned_out_dims, always, nested_blocks, propagate


def _kept_range(size: int, left: int, out_block: tuple[int, int]) -> tuple[int, int]:
    """[lo, hi): the input positions (global) that output block ``out_block`` of the padded dim holds."""
    offset, length = out_block
    lo = min(max(offset - left, 0), size)
    hi = min(max(offset + length - left, lo), size)
    return lo, hi


def pad_aligns(size: int, left: int, right: int, mesh_sizes) -> bool:
    """Does every coordinate's output block (torch.chunk of the padded size) hold only data from its own input
    block (torch.chunk of ``size``) and pad values?"""
    out_size = size + left + right
    for (offset, length), out_block in zip(nested_blocks(size, mesh_sizes), nested_blocks(out_size, mesh_sizes)):
        lo, hi = _kept_range(size, left, out_block)
        if hi > lo and not (offset <= lo and hi <= offset + length):
            return False
    return True


def _pads(pad, ndim: int) -> dict[int, tuple[int, int]]:
    """{dim: (left, right)} from aten's flat pad list (last dim first)."""
    return {ndim - 1 - i: (pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)}


@register_rule(aten.constant_pad_nd.default)
def constant_pad_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    pads = _pads(op.arg("pad"), spec.ndim)
    carriers = {d: (d, always) for d in range(spec.ndim)}
    for d, (left, right) in pads.items():
        if left or right:
            carriers[d] = (d, functools.partial(pad_aligns, spec.shape[d], left, right))
    inputs, outputs = propagate(spec.placements, aligned_out_dims(spec.placements, op.mesh_shape, carriers))
    sharded = sorted({p.dim for p in inputs if p.is_shard() and pads.get(p.dim, (0, 0)) != (0, 0)})
    sum_mesh_dims = [k for k, p in enumerate(inputs) if p.is_partial() and p.reduce_op == "sum"]
    if not sharded and not sum_mesh_dims:
        return Sharding(inputs=(inputs,), outputs=(outputs,))
    out_shape = [s + sum(pads.get(d, (0, 0))) for d, s in enumerate(spec.shape)]
    local_op = _local_pad(spec.shape, out_shape, spec.mesh, inputs, outputs, pads, sharded, sum_mesh_dims)
    return Sharding(inputs=(inputs,), outputs=(outputs,), local_op=local_op)


def _local_pad(shape, out_shape, mesh, inputs, outputs, pads, sharded, sum_mesh_dims):
    ndim = len(shape)

    def local_pad(x, pad, value=0):
        pad = list(pad)
        for d in sharded:
            left = pads[d][0]
            offset, _ = block(shape, mesh, inputs, d)
            out_block = block(out_shape, mesh, outputs, d)
            lo, hi = _kept_range(shape[d], left, out_block)
            x = x.narrow(d, lo - offset if hi > lo else 0, hi - lo)
            local_left = min(max(lo - (out_block[0] - left), 0), out_block[1])
            i = ndim - 1 - d
            pad[2 * i], pad[2 * i + 1] = local_left, out_block[1] - local_left - (hi - lo)
        coordinate = mesh.get_coordinate()
        if coordinate is not None and any(coordinate[k] for k in sum_mesh_dims):
            value = 0  # Partial(sum): only one rank's pads carry the value
        return aten.constant_pad_nd.default(x, pad, value)

    return local_pad

"""trace: the sum of a matrix's main diagonal.

Per mesh dim, by the input's placement there:

    input          input target     output
    Shard(0|1)     kept             Partial(sum): each rank sums the diagonal entries inside its block
    Partial(sum)   kept             Partial(sum)   (trace is linear)
    Partial(avg)   kept (floats)    Partial(avg)
    other Partial  Replicate        Replicate
    Replicate      kept             Replicate

The block of rows [r, ..) and columns [c, ..) holds the global diagonal entries (i, i) as its local diagonal
of offset r - c (local (i', j') with i' + r == j' + c). The offsets come from the global chunk geometry, which
every rank knows, so no rank needs another's data: the only collective is the later reduction of one number.

The backward (trace_backward, composite in autograd) fills a zero (rows * cols) vector at the diagonal's
flat positions with index_fill and views it as a matrix: plain tensors lifted to Replicate, index_fill's and
view's rules, no fallback; the leaf's gradient hook then slices the Replicate gradient to the leaf's Shard
for free.
"""

from __future__ import annotations

import torch

from dtensor_plus.placements import Partial, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rules
from dtensor_plus.spec import local_shape_and_offset

from .common import aten


def _keeps(p, dtype: torch.dtype) -> bool:
    """Does a Partial input pass through trace? Only the linear kinds, and avg only for floating values."""
    if dtype == torch.bool:
        return False
    return p.reduce_op == "sum" or (p.reduce_op == "avg" and (dtype.is_floating_point or dtype.is_complex))


def _block_trace(shape, mesh, placements):
    """trace of this rank's block: the local diagonal at the block's global offset (row start - col start)."""

    def local_op(x, *args, **kwargs):
        coordinate = mesh.get_coordinate()
        if coordinate is None:  # a rank outside the mesh holds nothing
            return x.new_zeros(()).sum()
        _, (row, col) = local_shape_and_offset(shape, mesh.shape, placements, coordinate)
        # torch.diagonal(offset=k) reads (i, i + k); an offset past the block's edge gives an empty diagonal
        return aten.trace.default(x) if row == col else torch.diagonal(x, row - col).sum()

    return local_op


def trace_rule(op: OpSchema) -> Sharding:
    spec = op.spec("self")
    inputs, outputs = [], []
    for p in spec.placements:
        if isinstance(p, Shard):
            inputs.append(p)
            outputs.append(Partial("sum"))
        elif p.is_partial() and not _keeps(p, spec.dtype):
            inputs.append(Replicate())
            outputs.append(Replicate())
        else:
            inputs.append(p)
            outputs.append(p)
    inputs = tuple(inputs)
    if not any(isinstance(p, Shard) for p in inputs):
        return Sharding(inputs={"self": inputs}, outputs=(tuple(outputs),))
    return Sharding(inputs={"self": inputs}, outputs=(tuple(outputs),),
                    local_op=_block_trace(spec.shape, spec.mesh, inputs))


register_rules({aten.trace.default: trace_rule})

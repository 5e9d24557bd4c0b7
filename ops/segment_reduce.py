"""segment_reduce and its backward: reductions over consecutive segments of one axis of ``data``.

``lengths`` (or ``offsets``) has shape (*data.shape[:axis], num_segments [+ 1]): its leading dims index the
data's leading dims, its last dim the segments. Per mesh dim, by the placement of the data-shaped tensors
there (data; grad, output and data in the backward):

    data-shaped    lengths/offsets    outputs      why
    Shard(d), d < axis     Shard(d)   Shard(d)     rows and their segment lengths live on the same rank
    Shard(d), d > axis     Replicate  Shard(d)     trailing dims ride along; every rank needs all lengths
    Shard(axis)            Replicate  Replicate    segments cross block boundaries: the axis is gathered
    Partial, Replicate     Replicate  Replicate    reduced first (max/min/prod/mean of pieces are not pieces)

The first Shard found among the data-shaped inputs on a mesh dim decides it; the others follow (they share
every dim but the axis). A sharded lengths/offsets alone (data replicated) is gathered.
"""

from __future__ import annotations

import functools

import torch

from dtensor_plus.placements import Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, normalize_dim

_INDEXING = ("lengths", "indices", "offsets")  # tensors laid out by the data's leading dims; the rest are data


def _mesh_dim_placement(specs, roles, mesh_dim: int, axis: int):
    """The Shard that data-shaped inputs keep on ``mesh_dim`` (None: everything Replicate there)."""
    for spec, role in zip(specs, roles):
        p = spec.placements[mesh_dim]
        if role == "data" and isinstance(p, Shard) and p.dim != axis:
            return p
    return None


@register_rule(aten.segment_reduce.default, aten._segment_reduce_backward.default)
def segment_reduce_rule(op: OpSchema) -> Sharding:
    axis = normalize_dim(op.arg("axis", 0), op.specs[0].ndim)  # specs[0]: data, or grad (same ndim)
    roles = ["index" if name in _INDEXING else "data" for name in op.names]
    targets = [[] for _ in op.specs]
    output = []
    for mesh_dim in range(len(op.mesh_shape)):
        keep = _mesh_dim_placement(op.specs, roles, mesh_dim, axis)
        output.append(keep or Replicate())
        for target, role in zip(targets, roles):
            if keep is None or (role == "index" and keep.dim > axis):
                target.append(Replicate())
            else:
                target.append(keep)  # index tensors share the data's leading dims, numbered alike
    return Sharding(inputs={name: tuple(t) for name, t in zip(op.names, targets)}, outputs=(tuple(output),),
                    local_op=functools.partial(_with_dense_index, op.func))


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides (a copy only where they differ)."""
    if t.stride() == torch.empty(t.shape, device="meta").stride():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _with_dense_index(func, *args, **kwargs):
    """``func`` on row-major blocks. A gathered (3, 1) block can carry strides (1, 3), contiguous by torch's
    rule (size-1 dims don't count), and torch's segment_reduce kernels misread such strides (a crash on one
    device too), so any tensor with other strides is copied first."""
    args = [_row_major(a) if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {k: _row_major(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return func(*args, **kwargs)

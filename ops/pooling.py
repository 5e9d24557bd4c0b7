"""Pooling and unpooling, forward and backward: max_pool2d/3d_with_indices, avg_pool2d/3d, adaptive avg and max
pools (2d, 3d), max_unpool2d/3d. The 1d forms are composite in aten and reach these as 2d.

Every tensor argument and output is (*leading, *spatial) with the same leading dims (batch, channels) and 2
or 3 spatial dims; each leading index is pooled on its own, and max-pool indices count within one spatial
plane, so they stay right in any leading block. Per mesh dim:

    tensors                                  outputs         why
    some argument Shard(d), d leading        Shard(d)        every argument is sliced alike: local
    Partial(sum | avg) on the linear         Partial(same)   avg pools (and their backward in grad_output)
      argument, the others Replicate                         and max_unpool (in the values) are linear
    anything else (a spatial dim sharded)    Replicate       a window crosses the shard boundary

torch's CPU kernels refuse an empty channel dim (and an unbatched empty one), so a leading block that is
empty on this rank (and only there) gets empty outputs of the right shape without calling them.
"""

from __future__ import annotations

from typing import Callable

import torch

from dtensor_plus.placements import Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, meta_outputs

_LINEAR = ("sum", "avg")

# op -> (number of spatial dims, name of the argument a Partial may stay on, or None). Public: resampling.py
# adds its ops (upsampling, pads, pixel shuffle), which treat each leading index on its own too.
PER_PLANE = {
    aten.max_pool2d_with_indices.default: (2, None),
    aten.max_pool2d_with_indices_backward.default: (2, None),
    aten.max_pool3d_with_indices.default: (3, None),
    aten.max_pool3d_with_indices_backward.default: (3, None),
    aten.adaptive_max_pool2d.default: (2, None),
    aten.adaptive_max_pool2d_backward.default: (2, None),
    aten.adaptive_max_pool3d.default: (3, None),
    aten.adaptive_max_pool3d_backward.default: (3, None),
    aten.avg_pool2d.default: (2, "self"),
    aten.avg_pool2d_backward.default: (2, "grad_output"),
    aten.avg_pool3d.default: (3, "self"),
    aten.avg_pool3d_backward.default: (3, "grad_output"),
    aten._adaptive_avg_pool2d.default: (2, "self"),
    aten._adaptive_avg_pool2d_backward.default: (2, "grad_output"),
    aten._adaptive_avg_pool3d.default: (3, "self"),
    aten._adaptive_avg_pool3d_backward.default: (3, "grad_output"),
    aten.max_unpool2d.default: (2, "self"),  # linear in the values, not in the indices
    aten.max_unpool3d.default: (3, "self"),
}


def _mesh_dim(placements: list[Placement], num_leading: int, linear: int | None) -> tuple[list[Placement], Placement]:
    """(target of each tensor argument, output placement) on one mesh dim."""
    for p in placements:
        if isinstance(p, Shard) and p.dim < num_leading:
            return [p] * len(placements), p
    if linear is not None:
        kept = placements[linear]
        others_replicate = all(q.is_replicate() for i, q in enumerate(placements) if i != linear)
        if kept.is_partial() and kept.reduce_op in _LINEAR and others_replicate:
            return list(placements), kept
    return [Replicate()] * len(placements), Replicate()


@register_rule(*PER_PLANE)
def pooling_rule(op: OpSchema) -> Sharding:
    num_spatial, linear = PER_PLANE[op.func]
    names = op.names
    linear_slot = names.index(linear) if linear in names else None
    num_leading = op.specs[0].ndim - num_spatial  # every tensor argument has the leading dims
    targets, outputs = [], []
    for k in range(len(op.mesh_shape)):
        target, out = _mesh_dim([s.placements[k] for s in op.specs], num_leading, linear_slot)
        targets.append(target)
        outputs.append(out)
    metas = meta_outputs(op)
    inputs = {name: tuple(t[i] for t in targets) for i, name in enumerate(names)}
    local_op = _skip_empty(op.func, tuple(op.specs[0].shape[:num_leading]), metas)
    return Sharding(inputs=inputs, outputs=(tuple(outputs),) * len(metas), local_op=local_op)


def _skip_empty(func, global_leading: tuple[int, ...], metas: list[torch.Tensor]) -> Callable:
    """``func``, or where this rank's block of a non-empty leading dim is empty, empty outputs (local leading
    sizes, global spatial sizes: spatial dims are whole) of the outputs' dtypes. A dim empty on one device
    too (a batch of 0) is left to ``func``, which behaves as it does there."""
    num_leading = len(global_leading)
    spatial = [tuple(m.shape[num_leading:]) for m in metas]
    dtypes = [m.dtype for m in metas]

    def local_op(first, *args, **kwargs):
        if all(size > 0 or whole == 0 for size, whole in zip(first.shape[:num_leading], global_leading)):
            return func(first, *args, **kwargs)
        leading = tuple(first.shape[:num_leading])
        outs = tuple(first.new_empty(leading + s, dtype=d) for s, d in zip(spatial, dtypes))
        return outs if len(outs) > 1 else outs[0]

    return local_op

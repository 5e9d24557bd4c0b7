"""renorm(x, p, dim, maxnorm): each slice x.select(dim, i) whose p-norm exceeds maxnorm is scaled down to it.

Per mesh dim, by the input's placement there:

    input                 input target   output      communication
    Shard(dim)            kept           Shard(dim)  none: every slice lives whole on its rank
    Shard(d), d != dim    kept           Shard(d)    one all-reduce of the per-slice sums of |x|^p
                                                     (max |x| for p = inf): x.shape[dim] numbers
    Partial               Replicate      Replicate   reduced first (a norm of pieces is not a piece)
    Replicate             kept           Replicate   none

Where some dim other than ``dim`` is sharded, the local op sums |x|^p over every dim but ``dim`` in its block,
all-reduces those per-slice sums over each mesh dim sharding such a dim (ranks in one such group hold the
same slices of ``dim``, so the sums line up), takes the root and scales its block: the same factor as on one
device, maxnorm / (norm + 1e-7) where norm > maxnorm, else 1. That moves x.shape[dim] numbers instead of
gathering x. ``p`` and ``maxnorm`` are floats, which the plan cache keys by type only, so the local op reads
them from its arguments at run time, never from the rule.

The backward decomposes (vector_norm, mul, sum, where, ...) into ops with their own rules.
"""

from __future__ import annotations

import math

import torch

from dtensor_plus.declared import AllReduce
from dtensor_plus.placements import Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, normalize_dim, without_partial

_EPS = 1e-7  # the guard torch's renorm adds to the norm before dividing (ATen's renorm_scale_factor)


def _slice_powers(x: torch.Tensor, p: float, dim: int) -> torch.Tensor:
    """Per slice of ``dim``, this block's share of the norm: sum |x|^p, or max |x| for p = inf (keepdim)."""
    reduce_dims = [d for d in range(x.ndim) if d != dim]
    magnitude = x.abs()
    if math.isinf(p):
        if magnitude.numel() == 0:  # an empty block: 0 is the identity of max over |x|
            return magnitude.new_zeros([1 if d != dim else n for d, n in enumerate(x.shape)])
        return magnitude.amax(reduce_dims, keepdim=True)
    return magnitude.pow(p).sum(reduce_dims, keepdim=True)


def _distributed_renorm(dim: int):
    """The local op where mesh dims shard dims other than ``dim``: per-slice norms all-reduced (declared)."""

    def local_op(x, p, dim_arg, maxnorm, *, comm):
        work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # accumulate as torch does
        powers = comm.all_reduce(_slice_powers(work, p, dim), "max" if math.isinf(p) else "sum")
        norm = powers if math.isinf(p) else powers.pow(1.0 / p)
        factor = torch.where(norm > maxnorm, maxnorm / (norm + _EPS), torch.ones_like(norm))
        return (work * factor).to(x.dtype)

    return local_op


@register_rule(aten.renorm.default)
def renorm_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    dim = normalize_dim(op.arg("dim"), spec.ndim)
    placements = without_partial(spec.placements)
    mesh_dims = [k for k, p in enumerate(placements)
                 if isinstance(p, Shard) and p.dim != dim and spec.mesh.shape[k] > 1]
    if not mesh_dims:
        return Sharding(inputs=(placements,), outputs=(placements,))
    # p = inf is part of the cache key (a mode); every other p shares one plan and sums powers.
    reduce_op = "max" if math.isinf(op.arg("p")) else "sum"
    return Sharding(inputs=(placements,), outputs=(placements,), local_op=_distributed_renorm(dim),
                    communication=(AllReduce(tuple(mesh_dims), (reduce_op,)),))

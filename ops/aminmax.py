"""aminmax(x, *, dim=None, keepdim=False) -> (min, max): amin and amax in one op.

Per mesh dim, by the input's placement there (d' = d renumbered when keepdim=False):

    input                    min             max
    Shard(d), d not reduced  Shard(d')       Shard(d')
    Shard(d), d reduced      Partial(min)    Partial(max)
    Partial                  Replicate       Replicate: reduced first (a max-Partial would not give the min)
    Replicate                Replicate       Replicate

A rank whose block is empty along a reduced dim returns the identities (+inf / the dtype's max for min, -inf /
the dtype's min for max), since torch refuses to reduce nothing; a globally empty reduction runs the op, which
raises as on one device. The same table as ops/reductions.py's amax/amin, whose helpers it reuses.
"""

from __future__ import annotations

import dataclasses

from dtensor_plus.placements import Partial
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten
from .reductions import _dims, _highest, _lowest, _reduction


def _local_aminmax(dims: frozenset, keepdim: bool, global_shape):
    globally_empty = any(global_shape[d] == 0 for d in dims)

    def local_op(x, *, dim=None, keepdim=keepdim):
        if globally_empty or not any(x.shape[d] == 0 for d in dims):
            return aten.aminmax.default(x, dim=dim, keepdim=keepdim)
        shape = [1 if d in dims else n for d, n in enumerate(x.shape)]
        if not keepdim:
            shape = [n for d, n in enumerate(shape) if d not in dims]
        return x.new_full(shape, _highest(x.dtype)), x.new_full(shape, _lowest(x.dtype))

    return local_op


@register_rule(aten.aminmax.default, strided="as_shard")  # min and max ignore row order
def aminmax_rule(op: OpSchema) -> Sharding:
    dims, keepdim = _dims(op)  # dim and keepdim are keyword-only: read by name
    sharding = _reduction(op, dims, keepdim, "max", local_op=_local_aminmax(dims, keepdim, op.spec("self").shape))
    mins = tuple(Partial("min") if p.is_partial() else p for p in sharding.outputs[1])
    return dataclasses.replace(sharding, outputs=(mins, sharding.outputs[1]))

"""Order selections along one dim that reduce it: kthvalue, mode, median.dim and nanmedian.dim (values and indices).

Per mesh dim, by the input's placement there (e = the selected dim; d' = d renumbered when keepdim=False):

    input                 values, indices
    Shard(d), d != e      Shard(d')     each rank selects in its own rows
    Shard(e)              Replicate     e gathered (only that mesh dim): the k-th value needs the whole dim
    Partial               Replicate     reduced first (an order statistic of pieces is not a piece)
    Replicate             Replicate

The median of all elements (median.default, nanmedian.default) needs the whole tensor: no exact form cheaper
than gathering it exists, so the rule says so (a Replicate input computes locally, with no traffic).

Like sort/topk in reductions.py, except that the selected dim goes away unless keepdim. The backward
(value_selecting_reduction_backward: unsqueeze, new_zeros, scatter) runs on existing rules.
"""

from __future__ import annotations

from dtensor_plus.placements import Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, normalize_dim, replicate_all


@register_rule(aten.kthvalue.default)
def kthvalue_rule(op: OpSchema) -> Sharding:
    return _select_along(op, dim_position=2)  # kthvalue(self, k, dim, keepdim)


@register_rule(aten.mode.default, aten.median.dim, aten.nanmedian.dim)
def select_along_rule(op: OpSchema) -> Sharding:
    return _select_along(op, dim_position=1)  # mode(self, dim, keepdim) and the medians alike


def _select_along(op: OpSchema, dim_position: int) -> Sharding:
    spec = op.specs[0]
    dim = normalize_dim(op.arg(dim_position, "dim", -1), spec.ndim)
    keepdim = bool(op.arg(dim_position + 1, "keepdim", False))
    inputs, outputs = [], []
    for p in spec.placements:
        if isinstance(p, Shard) and p.dim != dim:
            inputs.append(p)
            outputs.append(Shard(p.dim if keepdim else p.dim - (p.dim > dim)))
        else:
            inputs.append(Replicate())
            outputs.append(Replicate())
    return Sharding(inputs=(tuple(inputs),), outputs=(tuple(outputs),) * 2)


@register_rule(aten.median.default, aten.nanmedian.default)
def median_of_all_rule(op: OpSchema) -> Sharding:
    return replicate_all(op)

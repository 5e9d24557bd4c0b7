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


@register_rule(aten.kthvalue.default, aten.mode.default, aten.median.dim, aten.nanmedian.dim)
def select_along_rule(op: OpSchema) -> Sharding:
    """kthvalue(self, k, dim, keepdim), mode(self, dim, keepdim) and the medians alike: dim read by name."""
    spec = op.spec("self")
    dim = normalize_dim(op.arg("dim", -1), spec.ndim)
    keepdim = bool(op.arg("keepdim", False))
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

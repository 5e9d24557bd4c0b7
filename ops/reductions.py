"""Reductions and scans: sum, mean, nansum, count_nonzero, prod, max/min, amax/amin, argmax/argmin, var/std
(and var_mean/std_mean), linalg_vector_norm (``torch.norm`` decomposes to it), logsumexp, any/all; and the ops
along one dim: cumsum/cumprod, sort/topk.

Per mesh dim, by the input's placement there (R = the reduced dims; d' = d renumbered when keepdim=False):

    op                               Shard(d), d not in R   Shard(d), d in R             Partial(p) input
    sum                              Shard(d')              Partial(sum)                 p = sum, avg kept
    mean                             Shard(d')              Partial(sum) of local sum    p = sum, avg kept
                                                            / GLOBAL count (exact)
    nansum, count_nonzero            Shard(d')              Partial(sum)                 reduced first
    amax, max()  |  amin, min()      Shard(d')              Partial(max)  |  (min)       p = max  |  min kept
    any  |  all                      Shard(d')              Partial(max)  |  (min)       bool: max  |  min kept
    vector_norm ord = 0, 1 (ints)    Shard(d')              Partial(sum) of local norms  reduced first
    vector_norm ord = inf  |  -inf   Shard(d')              Partial(max)  |  (min)       reduced first
    vector_norm other ords, prod,    Shard(d')              Replicate (d gathered)       reduced first
      var, std, var_mean, std_mean, logsumexp, argmax, argmin, max(dim), min(dim)
    cumsum, cumprod, sort, topk      Shard(d)               along d: Replicate           cumsum: sum, avg kept
      (along dim e: "R" = {e})                                                           others reduced first

"Reduced first" means the Partial mesh dim goes to Replicate before the local op. A full reduction (no dim)
reduces every dim. Sums keep a Partial only where that stays linear: no bool, no float -> int cast, and
``avg`` only for floating values (integer avg floors). A max/min over a sharded dim substitutes the identity
(-inf / +inf, or the dtype's min / max; 0 and +inf for |x| in the inf-norms) for an empty local block, which
torch refuses to reduce; a globally empty reduction still runs the op, so it raises as on one device.

Not exact in one op, so gathered: norms with other ords (the root comes after the sum), var/std (not
linear), logsumexp, the indices of argmax / max(dim) (a (value, index) pair reduction is no single
collective) and scans along a sharded dim (an exclusive scan of the shard totals is a second collective).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dtensor_plus.placements import Partial, Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, normalize_dim, num_tensor_outputs

# -- dims and dtypes ------------------------------------------------------------------------------------


def _dims(op: OpSchema, empty_means_all: bool = True):
    """(reduced dims as a frozenset of non-negative dims, keepdim). ``dim`` None (or no ``dim`` argument: sum of
    everything) reduces every dim, and so does ``[]`` except for any/all.dims, where ``[]`` reduces nothing;
    no ``keepdim`` argument (var.correction reads it itself) is False."""
    ndim = op.specs[0].ndim
    dim = op.arg("dim")
    keepdim = bool(op.arg("keepdim", False))
    if dim is None or (empty_means_all and isinstance(dim, (list, tuple)) and len(dim) == 0):
        return frozenset(range(ndim)), keepdim
    dims = (dim,) if isinstance(dim, int) else dim
    return frozenset(normalize_dim(d, ndim) for d in dims) & frozenset(range(ndim)), keepdim  # 0-d: dim 0 is no dim


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _linear_keeps(reduce_op: str, in_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """May a Partial(reduce_op) input stay Partial through a sum-like (linear) op?"""
    if torch.bool in (in_dtype, out_dtype):
        return False  # a Partial bool is an OR of pieces, and a sum of ORs is not the OR's sum
    if reduce_op == "sum":
        return _is_float(out_dtype) or not _is_float(in_dtype)  # float -> int truncates each piece
    return reduce_op == "avg" and _is_float(in_dtype) and _is_float(out_dtype)


def _lowest(dtype: torch.dtype):
    if dtype == torch.bool:
        return False
    return -math.inf if _is_float(dtype) else torch.iinfo(dtype).min


def _highest(dtype: torch.dtype):
    if dtype == torch.bool:
        return True
    return math.inf if _is_float(dtype) else torch.iinfo(dtype).max


def _never(reduce_op: str) -> bool:
    return False


# -- the one reduction rule -----------------------------------------------------------------------------


def _reduction(
    op: OpSchema,
    dims: frozenset,
    keepdim: bool,
    combine: str | None = None,
    keeps: Callable[[str], bool] = _never,
    local_op: Callable | None = None,
) -> Sharding:
    """The table above for one op: ``combine`` is the Partial kind a sharded reduced dim turns into (None:
    gather that dim), ``keeps(reduce_op)`` says whether a Partial input passes through, and ``local_op``
    replaces the op only where some sharded dim is reduced into a Partial."""
    inputs: list[Placement] = []
    outputs: list[Placement] = []
    combined = False
    for p in op.specs[0].placements:
        if isinstance(p, Shard) and p.dim in dims:
            combined |= combine is not None
            inputs.append(p if combine else Replicate())
            outputs.append(Partial(combine) if combine else Replicate())
        elif isinstance(p, Shard):
            inputs.append(p)
            outputs.append(Shard(p.dim if keepdim else p.dim - sum(d < p.dim for d in dims)))
        elif p.is_partial() and keeps(p.reduce_op):
            inputs.append(p)
            outputs.append(p)
        else:
            inputs.append(Replicate())
            outputs.append(Replicate())
    num_outputs = num_tensor_outputs(op.func)
    return Sharding(inputs=(tuple(inputs),), outputs=(tuple(outputs),) * num_outputs,
                    local_op=local_op if combined else None)


def _filled(func, dims: frozenset, global_shape, identity: Callable) -> Callable:
    """``func`` on the local block, with an empty block (in a reduced dim) replaced by the identity of the
    combining reduction, since torch refuses to max/min over nothing. A globally empty reduction is left to
    ``func`` so that it raises, on every rank, as it does on one device."""
    globally_empty = any(global_shape[d] == 0 for d in dims)

    def local_op(x, *args, **kwargs):
        if not globally_empty and any(x.shape[d] == 0 for d in dims):
            x = x.new_full([1 if d in dims else size for d, size in enumerate(x.shape)], identity(x.dtype))
        return func(x, *args, **kwargs)

    return local_op


def _local_mean(dims: frozenset, keepdim: bool, count: int) -> Callable:
    """This rank's share of the mean: local sum / GLOBAL count, so that the Partial(sum) is exact even
    when the shards are uneven (a Partial(avg) of per-shard means is not)."""
    dim_list = sorted(dims)

    def local_op(x, *args, dtype=None, **kwargs):
        return aten.sum.dim_IntList(x, dim_list, keepdim, dtype=dtype) / count

    return local_op


# Reductions below are "as_shard" (dtensor_plus/strided.py): a sum, mean (global count), max, min, any or all
# over a dim does not care which rows each rank holds, so a StridedShard (e.g. a linear's bias gradient,
# summed over flattened (batch * sequence) rows under context parallelism) is reduced in place.

# -- linear reductions ----------------------------------------------------------------------------------


def _out_dtype(op: OpSchema) -> torch.dtype:
    spec = op.specs[0]
    dtype = op.arg("dtype")
    if dtype is not None:
        return dtype
    return torch.int64 if spec.dtype == torch.bool or not _is_float(spec.dtype) else spec.dtype


@register_rule(aten.sum.default, aten.sum.dim_IntList, strided="as_shard")
def sum_rule(op: OpSchema) -> Sharding:
    """Also the reduction of sum_to_size (expand's backward: sum.dim_IntList with keepdim=True)."""
    dims, keepdim = _dims(op)
    in_dtype, out_dtype = op.specs[0].dtype, _out_dtype(op)
    return _reduction(op, dims, keepdim, "sum", lambda r: _linear_keeps(r, in_dtype, out_dtype))


@register_rule(aten.mean.default, aten.mean.dim, strided="as_shard")
def mean_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    dims, keepdim = _dims(op)
    out_dtype = op.arg("dtype") or spec.dtype
    count = math.prod(spec.shape[d] for d in dims)
    return _reduction(op, dims, keepdim, "sum", lambda r: _linear_keeps(r, spec.dtype, out_dtype),
                      _local_mean(dims, keepdim, count))


@register_rule(aten.nansum.default)
def nansum_rule(op: OpSchema) -> Sharding:
    """Partial inputs are reduced first: a NaN piece would hide the other pieces' values."""
    dims, keepdim = _dims(op)
    return _reduction(op, dims, keepdim, "sum")


@register_rule(aten.count_nonzero.default, aten.count_nonzero.dim_IntList)
def count_nonzero_rule(op: OpSchema) -> Sharding:
    dims, _ = _dims(op)
    return _reduction(op, dims, False, "sum")


# -- order reductions -----------------------------------------------------------------------------------


def _order_reduction(op: OpSchema, dims: frozenset, keepdim: bool, kind: str) -> Sharding:
    """max/min of values: a Partial of the same kind passes through (max of partial maxes)."""
    identity = _lowest if kind == "max" else _highest
    local_op = _filled(op.func, dims, op.specs[0].shape, identity)
    return _reduction(op, dims, keepdim, kind, lambda r: r == kind, local_op)


@register_rule(aten.amax.default, aten.max.default, strided="as_shard")
def max_rule(op: OpSchema) -> Sharding:
    return _order_reduction(op, *_dims(op), "max")


@register_rule(aten.amin.default, aten.min.default, strided="as_shard")
def min_rule(op: OpSchema) -> Sharding:
    return _order_reduction(op, *_dims(op), "min")


@register_rule(aten.any.default, aten.any.dim, aten.any.dims, strided="as_shard")
def any_rule(op: OpSchema) -> Sharding:
    """any = OR = max over bools (collectives all-reduce bools as uint8); a Partial(max) of bools is an OR."""
    dims, keepdim = _dims(op, empty_means_all=op.func != aten.any.dims)
    is_bool = op.specs[0].dtype == torch.bool
    return _reduction(op, dims, keepdim, "max", lambda r: r == "max" and is_bool)


@register_rule(aten.all.default, aten.all.dim, aten.all.dims, strided="as_shard")
def all_rule(op: OpSchema) -> Sharding:
    """all = AND = min over bools; an empty block gives True, the identity, by itself."""
    dims, keepdim = _dims(op, empty_means_all=op.func != aten.all.dims)
    is_bool = op.specs[0].dtype == torch.bool
    return _reduction(op, dims, keepdim, "min", lambda r: r == "min" and is_bool)


# -- norms ----------------------------------------------------------------------------------------------


def _norm_combine(ord_) -> tuple[str | None, Callable | None]:
    """(Partial kind, empty-block identity) of the exact one-op form for this ord, or (None, None).

    Only int ords and +-inf are safe to branch on: dispatch keys other floats by type alone, so a plan made
    for ord=1.0 would be reused for ord=2.5.
    """
    if type(ord_) is int and ord_ in (0, 1):
        return "sum", None  # count of nonzeros, sum of |x|: both add up over shards
    if type(ord_) is float and math.isinf(ord_):
        if ord_ > 0:
            return "max", lambda dtype: 0  # |x| >= 0
        return "min", lambda dtype: math.inf
    return None, None


@register_rule(aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim)
def vector_norm_rule(op: OpSchema) -> Sharding:
    dims, keepdim = _dims(op)
    combine, identity = _norm_combine(op.arg("ord", 2))
    local_op = _filled(op.func, dims, op.specs[0].shape, identity) if identity else None
    return _reduction(op, dims, keepdim, combine, local_op=local_op)


# -- reductions gathered over sharded reduced dims ------------------------------------------------------


@register_rule(aten.prod.default, aten.prod.dim_int, aten.logsumexp.default, aten.max.dim, aten.min.dim,
               aten.argmax.default, aten.argmin.default)
def gathering_reduction_rule(op: OpSchema) -> Sharding:
    """Shards of kept dims stay; sharded reduced dims are gathered; Partial inputs reduced first."""
    return _reduction(op, *_dims(op))


@register_rule(aten.var.correction, aten.std.correction, aten.var_mean.correction, aten.std_mean.correction)
def moment_rule(op: OpSchema) -> Sharding:
    """keepdim is keyword-only here (after correction): read by name like everywhere."""
    return _reduction(op, *_dims(op))


# -- ops along one dim ----------------------------------------------------------------------------------

_CUMSUMS = (aten.cumsum.default, aten.cumsum_.default)
_ALONG_DIM = (*_CUMSUMS, aten.cumprod.default, aten.cumprod_.default, aten.sort.default, aten.sort.stable,
              aten.topk.default, aten.cummax.default, aten.cummin.default, aten.logcumsumexp.default)


@register_rule(*_ALONG_DIM)
def along_dim_rule(op: OpSchema) -> Sharding:
    """Output shape follows the input, so Shards of other dims stay as they are; the dim the op runs along
    is gathered. cumsum is linear: a Partial(sum|avg) passes through it."""
    spec = op.specs[0]
    dim = normalize_dim(op.arg("dim", -1), spec.ndim)
    out_dtype = op.arg("dtype") or spec.dtype

    def keeps(p: Placement) -> bool:
        if p.is_partial():
            return op.func in _CUMSUMS and _linear_keeps(p.reduce_op, spec.dtype, out_dtype)
        return not p.is_shard(dim)

    placements = tuple(p if keeps(p) else Replicate() for p in spec.placements)
    return Sharding(inputs=(placements,), outputs=(placements,) * num_tensor_outputs(op.func))

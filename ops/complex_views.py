"""Complex <-> real: the views ``view_as_real`` and ``view_as_complex`` (and their copies) and
``complex(real, imag)``.

Per mesh dim:

    view_as_real      (...) complex -> (..., 2) real   Shard(d) -> Shard(d); the new last dim is never sharded
    view_as_complex   (..., 2) real -> (...) complex   Shard(d) -> Shard(d) for d < last; a Shard of the last
                                                       dim (the (re, im) pair) is gathered on that mesh dim
    complex           elementwise over (real, imag): the pointwise rule (ops/pointwise.py), Partials reduced

Both views are linear over the reals, so Partial(sum|avg) passes; Partial(max|min) of a complex number means
nothing and of its (re, im) pair is not what max of the pair's parts gives back, so it is reduced first.

``resolve_conj`` / ``resolve_neg`` need no rule: a DTensor never carries the lazy conj/neg bit (``_conj`` and
``_neg_view`` materialise it on the local block, ops/pointwise.py), so they return it above the dispatcher.
"""

from __future__ import annotations

from dtensor_plus.placements import Replicate
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten
from .pointwise import pointwise_rule

_LINEAR = ("sum", "avg")


def _kept(p, ndim_limit: int):
    """``p`` where it survives (a Shard of a dim below ``ndim_limit``, Replicate, a linear Partial)."""
    if p.is_partial():
        return p if p.reduce_op in _LINEAR else Replicate()
    if p.is_shard() and p.dim >= ndim_limit:
        return Replicate()
    return p


def _local_view_as_complex(func):
    def local_op(x):
        try:
            return func(x)
        except RuntimeError:  # a local block whose strides are not (..., 2:1) after some layout change (or an
            # empty one, which contiguous() leaves with odd strides): a fresh row-major copy
            return func(x.new_empty(x.shape).copy_(x))

    return local_op


@register_rule(aten.view_as_real.default, aten.view_as_real_copy.default, strided="as_shard")
def view_as_real_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    placements = tuple(_kept(p, spec.ndim) for p in spec.placements)
    return Sharding(inputs=(placements,), outputs=(placements,))


@register_rule(aten.view_as_complex.default, aten.view_as_complex_copy.default, strided="as_shard")
def view_as_complex_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    placements = tuple(_kept(p, spec.ndim - 1) for p in spec.placements)
    return Sharding(inputs=(placements,), outputs=(placements,), local_op=_local_view_as_complex(op.func))


register_rule(aten.complex.default, strided="as_shard")(pointwise_rule)  # broadcasting, like add

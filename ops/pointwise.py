"""Pointwise ops with broadcasting, in bulk from ``pointwise_ops.POINTWISE_OPS``.

Per mesh dim, the output is Shard of a dim some input shards (the largest such input wins), else Replicate;
inputs follow it (a broadcast dim is never sharded). Partial inputs stay Partial through linear ops:

    add / sub          Partial + Partial; Partial(sum) + Replicate (the Replicate is partitioned, no traffic);
                       Partial(avg|max|min) + Replicate or a scalar (adding the same value commutes)
    mul / div          one Partial(sum|avg) factor times Replicate or scalar factors (div: numerator only)
    neg, clone, casts  Partial(sum|avg); clone and casts also keep max and min (they preserve order); clone
                       keeps product

Every other op reduces its Partial inputs first.
"""

from __future__ import annotations

import torch

from dtensor_plus.placements import Partial, Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import DTensorSpec

from .common import aten, num_tensor_outputs
from .pointwise_ops import POINTWISE_OPS

_ADD = {aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor}
_MUL = {aten.mul.Tensor, aten.mul_.Tensor, aten.mul.Scalar, aten.mul_.Scalar}
_DIV = {aten.div.Tensor, aten.div_.Tensor, aten.div.Scalar, aten.div_.Scalar}
_NEG = {aten.neg.default, aten.neg_.default}
_ORDER_KEEPING = {aten.clone.default, aten._to_copy.default, aten.positive.default}


def _keeps_partial(op: OpSchema, placements: list[Placement], reduce_op: str) -> bool:
    """May the output stay Partial(reduce_op) on this mesh dim, given each input's placement?"""
    func = op.func
    partial_at = [i for i, p in enumerate(placements) if p.is_partial()]
    if any(placements[i] != Partial(reduce_op) for i in partial_at):
        return False
    others_replicated = all(p.is_replicate() for p in placements if not p.is_partial())
    linear_op = reduce_op in ("sum", "avg")
    if func in _ADD:
        scalar_addend = len(op.specs) == 1 and op.spec("other") is None
        if reduce_op == "sum":
            return others_replicated and not scalar_addend
        if reduce_op == "avg":
            return others_replicated
        if reduce_op not in ("max", "min"):  # a product does not commute with adding a value
            return False
        return others_replicated and partial_at == [0] and op.arg("alpha", 1) == 1  # max/min: + same value
    if func in _MUL:
        return linear_op and len(partial_at) == 1 and others_replicated
    if func in _DIV:
        return linear_op and partial_at == [0] and others_replicated
    if func in _NEG:
        return linear_op
    if func in _ORDER_KEEPING:
        # A cast of each factor is not the cast of their product (an int cast of 0.5 * 4): only clone keeps it.
        return reduce_op != "product" or func is not aten._to_copy.default
    return False


def _input_dim(out_dim: int, spec: DTensorSpec, out_shape) -> int | None:
    """The input dim that feeds output dim ``out_dim``, or None where the input broadcasts along it."""
    in_dim = out_dim - (len(out_shape) - spec.ndim)
    if in_dim < 0 or (spec.shape[in_dim] == 1 and out_shape[out_dim] != 1):
        return None
    return in_dim


def _output_dim(placement: Placement, spec: DTensorSpec, out_shape) -> int | None:
    if not isinstance(placement, Shard):
        return None
    out_dim = placement.dim + len(out_shape) - spec.ndim
    return out_dim if _input_dim(out_dim, spec, out_shape) is not None else None


def _choose_output(op, mesh_dim, placements, out_shape, inplace) -> Placement:
    specs = op.specs
    if inplace:
        own = placements[0]
        if own.is_partial() and not _keeps_partial(op, placements, own.reduce_op):
            return Replicate()
        return own
    partial = next((p for p in placements if p.is_partial()), None)
    if partial is not None and _keeps_partial(op, placements, partial.reduce_op):
        return partial
    sharded = [(spec.shape.numel(), _output_dim(p, spec, out_shape)) for p, spec in zip(placements, specs)]
    sharded = [(numel, d) for numel, d in sharded if d is not None]
    if sharded:
        return Shard(max(sharded)[1])
    return Replicate()


def _fit_input(want: Placement, current: Placement, spec: DTensorSpec, out_shape, op) -> Placement:
    if isinstance(want, Shard):
        in_dim = _input_dim(want.dim, spec, out_shape)
        return Shard(in_dim) if in_dim is not None else Replicate()
    if want.is_partial():
        if current.is_partial():
            return current
        return want if (op.func in _ADD and want.reduce_op == "sum") else Replicate()
    return Replicate()


def pointwise_rule(op: OpSchema) -> Sharding:
    specs = op.specs
    out_shape = torch.broadcast_shapes(*(s.shape for s in specs))
    inplace = op.record.inplace
    inputs = [[] for _ in specs]
    output = []
    for mesh_dim in range(len(op.mesh_shape)):
        placements = [s.placements[mesh_dim] for s in specs]
        want = _choose_output(op, mesh_dim, placements, out_shape, inplace)
        output.append(want)
        for i, spec in enumerate(specs):
            inputs[i].append(_fit_input(want, placements[i], spec, out_shape, op))
    return Sharding(inputs=tuple(map(tuple, inputs)), outputs=(tuple(output),) * num_tensor_outputs(op.func))


def _resolve(name: str):
    packet, overload = name.split(".")
    return getattr(getattr(aten, packet), overload)


register_rule(*(_resolve(name) for name in POINTWISE_OPS), strided="as_shard")(pointwise_rule)


@register_rule(aten.copy_.default, strided="as_shard")
def copy_rule(op: OpSchema) -> Sharding:
    """``self.copy_(src)``: src moves to self's layout (broadcast dims of src replicated)."""
    dst, src = op.spec("self"), op.spec("src")
    if src is None:  # a plain 0-d src (checked equal on every rank): partitioned into a Partial dst
        local_op = _partitioned_copy(op.mesh, dst.placements) if dst.has_partial() else None
        return Sharding(inputs={}, outputs=(dst.placements,), local_op=local_op)
    target = tuple(_fit_input(p, Replicate(), src, dst.shape, op) if not p.is_partial() else Replicate() for p in dst.placements)
    # A Partial destination takes a replicated value partitioned into it.
    target = tuple(Partial(p.reduce_op) if p.is_partial() else t for p, t in zip(dst.placements, target))
    return Sharding(inputs={"src": target}, outputs=(dst.placements,))


def _partitioned_copy(mesh, placements):
    """copy_ of a replicated scalar into a Partial block: a Partial(sum) keeps it at index 0 of its mesh dims and
    0 elsewhere (the pieces sum to it), a Partial(product) 1 elsewhere; avg, max and min keep it everywhere."""

    def local_op(self, src, non_blocking=False):
        coordinate = mesh.get_coordinate()
        for m, p in enumerate(placements):
            if p.is_partial():
                src = p.partition(src, mesh.size(m), coordinate[m])
        return self.copy_(src, non_blocking)

    return local_op


@register_rule(aten._conj.default, aten._neg_view.default, strided="as_shard")
def lazy_view_rule(op: OpSchema) -> Sharding:
    """``conj()`` / ``neg`` as lazy views set a bit on the tensor that only torch's own dispatch layers above
    ``__torch_dispatch__`` honour: inside it, the ops we run on local blocks would read the raw values. So the
    block is conjugated (negated) for real here and the DTensor holds the values, not a bit. Linear over the
    reals: any layout, Partial included, passes through."""
    local_op = aten.conj_physical.default if op.func is aten._conj.default else aten.neg.default
    return Sharding(inputs=(None,), outputs=(op.specs[0].placements,), local_op=local_op)

"""Factory ops that take a DTensor for its shape or metadata (``*_like``, ``new_*``) and the fills.

None of them reads the input's values, so none moves the input. Per mesh dim of the input:

    op                                   Shard(d)    Replicate    Partial
    zeros_like, zero_                    Shard(d)    Replicate    Partial (0 is a valid piece of any reduce)
    empty_like                           Shard(d)    Replicate    Partial (no values to keep: the layout is all
                                                                  it copies, and module.to_empty() keeps it)
    ones_like, full_like                 Shard(d)    Replicate    Replicate (the local block is whole-shaped)
    fill_ / fill (Scalar or Tensor)      Shard(d)    Replicate    Replicate; fill_ on a Partial self goes out
                                                                  of place and copies the value back
                                                                  (partitioned into the Partial pieces)
    new_zeros/ones/empty/full,           self's own shape: self's layout (Partial -> Replicate);
      new_empty_strided                  any other shape: Replicate, built whole on every rank

A StridedShard is kept as a Shard would be (no positions matter: dropout's ``empty_like`` of a zigzag or
folded sequence does not gather). A DTensor fill value (fill_.Tensor) is replicated. ``empty_strided`` and
``scalar_tensor`` take no tensor, so they never reach a DTensor; build sharded tensors with
``dtensor_plus.zeros`` and friends.
"""

from __future__ import annotations

from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, replicated, without_partial


@register_rule(aten.zeros_like.default, aten.zero_.default, aten.zero.default, aten.empty_like.default,
               strided="as_shard")
def zeros_rule(op: OpSchema) -> Sharding:
    return Sharding(inputs=(None,), outputs=(op.specs[0].placements,))


@register_rule(aten.ones_like.default, aten.full_like.default, strided="as_shard")
def like_rule(op: OpSchema) -> Sharding:
    return Sharding(inputs=(None,), outputs=(without_partial(op.specs[0].placements),))


@register_rule(aten.fill_.Scalar, aten.fill.Scalar, aten.fill_.Tensor, aten.fill.Tensor)
def fill_rule(op: OpSchema) -> Sharding:
    """(self, value): a Partial self becomes Replicate (for fill_, the dispatcher's out-of-place path)."""
    value = {"value": replicated(len(op.mesh_shape))} if op.spec("value") is not None else {}  # a 0-d DTensor
    return Sharding(inputs=value, outputs=(without_partial(op.spec("self").placements),))


@register_rule(
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_empty.default,
    aten.new_full.default,
    aten.new_empty_strided.default,
    strided="as_shard",
)
def new_rule(op: OpSchema) -> Sharding:
    """(self, size, ...): a tensor of self's own global shape keeps self's Shard/Replicate layout (autograd
    allocates gradient buffers this way; a Replicate buffer would gather the gradient copied into it); any
    other size is built whole on every rank."""
    self_spec = op.spec("self")
    if tuple(op.arg("size")) != tuple(self_spec.shape):
        return Sharding(inputs=(None,), outputs=(replicated(len(op.mesh_shape)),))
    local_op = _new_empty_strided_local if op.func is aten.new_empty_strided.default else None
    return Sharding(inputs=(None,), outputs=(without_partial(self_spec.placements),), shape_arg=1, local_op=local_op)


def _new_empty_strided_local(self_local, size, stride, **kwargs):
    """``size`` is already this rank's block; the global ``stride`` only tells the order of the dims."""
    local_stride, step = [0] * len(size), 1
    for d in sorted(range(len(size)), key=lambda d: (stride[d], -d)):
        local_stride[d] = step
        step *= max(size[d], 1)
    return aten.new_empty_strided.default(self_local, size, local_stride, **kwargs)

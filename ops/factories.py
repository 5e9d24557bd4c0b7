"""Factory ops that take a DTensor for its shape or metadata (``*_like``, ``new_*``) and the fills.

None of them reads the input's values, so none moves the input. Per mesh dim of the input:

    op                                   Shard(d)    Replicate    Partial
    zeros_like, zero_                    Shard(d)    Replicate    Partial (0 is a valid piece of any reduce)
    ones_like, empty_like, full_like     Shard(d)    Replicate    Replicate (the local block is whole-shaped)
    fill_ / fill (Scalar or Tensor)      Shard(d)    Replicate    Replicate; fill_ on a Partial self goes out
                                                                  of place and copies the value back
                                                                  (partitioned into the Partial pieces)
    new_zeros/ones/empty/full,           Replicate: a new tensor of the given global shape on every rank
      new_empty_strided

A DTensor fill value (fill_.Tensor) is replicated. ``empty_strided`` and ``scalar_tensor`` take no tensor, so
they never reach a DTensor; build sharded tensors with ``dtensor_plus.zeros`` and friends.
"""

from __future__ import annotations

from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, replicated, without_partial


@register_rule(aten.zeros_like.default, aten.zero_.default, aten.zero.default)
def zeros_rule(op: OpSchema) -> Sharding:
    return Sharding(inputs=(None,), outputs=(op.specs[0].placements,))


@register_rule(aten.ones_like.default, aten.empty_like.default, aten.full_like.default)
def like_rule(op: OpSchema) -> Sharding:
    return Sharding(inputs=(None,), outputs=(without_partial(op.specs[0].placements),))


@register_rule(aten.fill_.Scalar, aten.fill.Scalar, aten.fill_.Tensor, aten.fill.Tensor)
def fill_rule(op: OpSchema) -> Sharding:
    """(self, value): a Partial self becomes Replicate (for fill_, the dispatcher's out-of-place path)."""
    r = replicated(len(op.mesh_shape))
    inputs = (None,) + (r,) * (len(op.specs) - 1)  # a 0-d DTensor value
    return Sharding(inputs=inputs, outputs=(without_partial(op.specs[0].placements),))


@register_rule(
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_empty.default,
    aten.new_full.default,
    aten.new_empty_strided.default,
)
def new_rule(op: OpSchema) -> Sharding:
    """self gives only dtype and device; the size argument is global, so every rank builds it whole."""
    return Sharding(inputs=(None,), outputs=(replicated(len(op.mesh_shape)),))

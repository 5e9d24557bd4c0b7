"""Random ops: dropout, bernoulli, normal, the in-place samplers and the random ``*_like`` factories.

Which numbers each rank draws is not decided here: the dispatcher runs every op tagged
``nondeterministic_seeded`` inside ``dtensor_plus.random.rng_for`` (one stream per shard of the output,
so Replicate outputs agree on every rank) or, in strict mode, on the whole tensor. The rules only say
where the output lives. Per mesh dim:

    op kind                                      input             output
    native_dropout (train or eval)               Partial reduced   input's Shard/Replicate (out and mask)
    value-dependent draws (bernoulli(probs),     broadcast like    Shard of a dim an input shards, else
      normal(mean, std)...)                      pointwise ops     Replicate; Partial inputs reduced
    shape-only draws (bernoulli.p, rand_like,    untouched         input's Shard/Replicate; Partial ->
      randn_like, randint_like)                  (no collective)   Replicate (the local block is whole)
    in-place samplers (bernoulli_, normal_,      untouched         self's placements; on a Partial self
      uniform_, exponential_, random_, ...)                        one rank per Partial mesh dim keeps the
                                                                   draw and the others hold the identity
                                                                   (0 for sum; the draw for avg/max/min)

Each rule is position-independent, so a StridedShard (a zigzag sequence, or a sequence on two context mesh
dims folded to rows by a linear layer) is read as a Shard and kept (dtensor_plus/strided.py): the op draws
locally, from the stream of its shard index, as it does for a Shard, never gathering first.
"""

from __future__ import annotations

import torch

from dtensor_plus.placements import Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import DTensorSpec

from .common import aten, replicated, without_partial


def _native_dropout(input, p, train=None):
    # NOTE: torch's CPU kernel returns the input itself and a *float* mask for an empty input (the meta
    # kernel says bool); an empty shard beside non-empty ones would then gather masks of mixed dtypes.
    if input.numel() == 0:
        return input.clone(), torch.empty_like(input, dtype=torch.bool)
    return aten.native_dropout.default(input, p, train)


@register_rule(aten.native_dropout.default, strided="as_shard")
def native_dropout_rule(op: OpSchema) -> Sharding:
    """(input, p, train) -> (out, mask): elementwise, so any Shard stays; the values must be reduced."""
    target = without_partial(op.specs[0].placements)
    return Sharding(inputs=(target,), outputs=(target, target), local_op=_native_dropout)


# -- value-dependent draws: a pointwise op whose inputs are parameters of the distribution ------------


def _follow(placements, out_shape, spec: DTensorSpec) -> tuple[Placement, ...]:
    """``spec``'s layout to feed an output laid out as ``placements`` (broadcast dims replicated)."""
    offset = len(out_shape) - spec.ndim
    result = []
    for p in placements:
        in_dim = p.dim - offset if isinstance(p, Shard) else -1
        keep = in_dim >= 0 and spec.shape[in_dim] == out_shape[p.dim]
        result.append(Shard(in_dim) if keep else Replicate())
    return tuple(result)


def _output_placement(mesh_dim: int, specs, out_shape) -> Placement:
    """The first Shard of a non-broadcast dim among the inputs on this mesh dim, else Replicate."""
    for spec in specs:
        p = spec.placements[mesh_dim]
        if isinstance(p, Shard):
            out_dim = p.dim + len(out_shape) - spec.ndim
            if spec.shape[p.dim] == out_shape[out_dim]:
                return Shard(out_dim)
    return Replicate()


@register_rule(
    aten.bernoulli.default,
    aten.bernoulli.Tensor,
    aten.normal.Tensor_float,
    aten.normal.float_Tensor,
    aten.normal.Tensor_Tensor,
    strided="as_shard",
)
def value_draw_rule(op: OpSchema) -> Sharding:
    out_shape = torch.broadcast_shapes(*(s.shape for s in op.specs))
    out = tuple(_output_placement(k, op.specs, out_shape) for k in range(len(op.mesh_shape)))
    return Sharding(inputs=tuple(_follow(out, out_shape, s) for s in op.specs), outputs=(out,))


# -- shape-only draws ---------------------------------------------------------------------------------


@register_rule(
    aten.bernoulli.p,
    aten.rand_like.default,
    aten.randn_like.default,
    aten.randint_like.default,
    aten.randint_like.low_dtype,
    aten.randint_like.Tensor,
    strided="as_shard",
)
def shape_draw_rule(op: OpSchema) -> Sharding:
    """Only self's shape matters: keep its blocks as they are; a Partial block is the whole shape."""
    high = {"high": replicated(len(op.mesh_shape))} if op.spec("high") is not None else {}  # randint_like.Tensor
    return Sharding(inputs=high, outputs=(without_partial(op.spec("self").placements),))


# -- in-place samplers --------------------------------------------------------------------------------


def _partitioned(func, placements: tuple[Placement, ...], mesh):
    """Run ``func`` in place, then leave the draw on one rank per Partial(sum) mesh dim and 0 elsewhere,
    so the Partial tensor's value is the draw itself (avg/max/min of equal draws is the draw)."""
    sum_dims = [k for k, p in enumerate(placements) if p.is_partial() and p.reduce_op == "sum"]

    def local_op(self, *args, **kwargs):
        func(self, *args, **kwargs)
        coordinate = mesh.get_coordinate()
        if any(coordinate[k] != 0 for k in sum_dims):
            self.zero_()
        return self

    return local_op


@register_rule(
    aten.bernoulli_.float,
    aten.bernoulli_.Tensor,
    aten.normal_.default,
    aten.uniform_.default,
    aten.exponential_.default,
    aten.geometric_.default,
    aten.log_normal_.default,
    aten.cauchy_.default,
    aten.random_.default,
    getattr(aten.random_, "from"),  # a Python keyword
    aten.random_.to,
    strided="as_shard",
)
def inplace_draw_rule(op: OpSchema) -> Sharding:
    """self keeps its layout; a DTensor ``p`` (bernoulli_.Tensor) follows self like a pointwise operand."""
    self_spec = op.spec("self")
    placements = self_spec.placements
    follow = {name: _follow(without_partial(placements), self_spec.shape, s)
              for name, s in zip(op.names, op.specs) if name != "self"}
    local_op = _partitioned(op.func, placements, op.mesh) if self_spec.has_partial() else None
    return Sharding(inputs=follow, outputs=(placements,), local_op=local_op)

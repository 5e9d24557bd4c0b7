"""Softmax and log-softmax, forward and backward.

Softmax normalises along one dim, so that dim must be whole on every rank; every other dim may stay
sharded. Per mesh dim (``dim`` is the softmax dim):

    input / output          forward output         backward (grad, output) -> grad_input
    Shard(d), d != dim      Shard(d)               grad follows: Shard(d)
    Shard(dim)              Replicate (gathered)   Replicate
    Replicate               Replicate              Replicate; a Shard(d != dim) grad slices output for free
    Partial                 Replicate (reduced)    output reduced to Replicate
    grad Partial(sum|avg)                          stays Partial where the output is Replicate: the
                                                   backward is linear in grad for a fixed output
"""

from __future__ import annotations

from dtensor_plus.placements import Partial, Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, normalize_dim


def _whole_along(placement: Placement, dim: int) -> Placement:
    """The placement after making tensor dim ``dim`` whole (and Partial values reduced)."""
    if placement.is_partial() or placement.is_shard(dim):
        return Replicate()
    return placement


@register_rule(aten._softmax.default, aten._log_softmax.default, aten._safe_softmax.default, strided="as_shard")
def softmax_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    dim = normalize_dim(op.arg("dim"), spec.ndim)
    target = tuple(_whole_along(p, dim) for p in spec.placements)
    return Sharding(inputs=(target,), outputs=(target,))


def _backward_pair(grad: Placement, output: Placement, dim: int) -> tuple[Placement, Placement, Placement]:
    """(grad target, output target, grad_input placement) on one mesh dim."""
    base = _whole_along(output, dim)
    if base.is_replicate():
        if isinstance(grad, Shard) and grad.dim != dim:
            base = grad  # slicing the replicated output is free; gathering the grad is not
        elif grad.is_partial() and grad.reduce_op in ("sum", "avg"):
            return grad, base, Partial(grad.reduce_op)
    return base, base, base


@register_rule(aten._softmax_backward_data.default, aten._log_softmax_backward_data.default, strided="as_shard")
def softmax_backward_rule(op: OpSchema) -> Sharding:
    """(grad_output, output, dim, input_dtype): both move to one layout whole along ``dim``."""
    grad, output = op.spec("grad_output"), op.spec("output")
    dim = normalize_dim(op.arg("dim"), output.ndim)
    pairs = [_backward_pair(g, o, dim) for g, o in zip(grad.placements, output.placements)]
    grad_target, output_target, result = (tuple(p[i] for p in pairs) for i in range(3))
    return Sharding(inputs={"grad_output": grad_target, "output": output_target}, outputs=(result,))

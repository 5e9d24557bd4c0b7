"""Fractional max pooling, forward and backward: fractional_max_pool2d/3d(self, kernel_size, output_size,
random_samples) -> (output, indices) and their backwards (grad_output, self, kernel_size, output_size, indices).

Each (batch, channel) plane is pooled on its own, with its own pair (triple) of random samples: ``random_samples``
is (N, C, num_spatial) beside a batched input (N, C, *spatial), and (1, C, num_spatial) beside an unbatched one
(C, *spatial). So a leading dim of the input may be sharded when the samples are sliced alike along the matching
dim; F.fractional_max_pool* draws the samples on every rank as a plain tensor, which joins as Replicate and is
sliced for free. Indices count within one spatial plane, so they stay right in any leading block. Per mesh dim:

    input                  random_samples                     outputs      why
    Shard(d), d leading    Shard(matching dim)                Shard(d)     planes and their samples sliced alike
    Replicate              Shard(e), e its batch or channel   Shard(d)     the input is sliced for free
                           dim (not the size-1 batch of an
                           unbatched input)
    anything else          Replicate                          Replicate    a window crosses a spatial shard

The backwards have one shape of leading dims in every argument: pooling.py's per-plane rule, as it is.

torch 2.13 has no meta kernel for fractional_max_pool3d_backward, and the dispatcher learns output shapes on
meta tensors (without one, it falls back): this file gives it one in our registry (``rules.register_meta``:
grad_input has the input's shape and the gradient's dtype); torch's own dispatch table is left alone.
"""

from __future__ import annotations

from dtensor_plus.placements import Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_meta, register_rule

from .common import aten, meta_outputs, replicate_all
from .pooling import PER_PLANE, _skip_empty, pooling_rule

_FORWARD = {aten.fractional_max_pool2d.default: 2, aten.fractional_max_pool3d.default: 3}
_BACKWARD = {aten.fractional_max_pool2d_backward.default: (2, None),
             aten.fractional_max_pool3d_backward.default: (3, None)}


@register_meta(aten.fractional_max_pool3d_backward.default)  # torch 2.13 has no meta kernel for it
def _meta_pool3d_backward(grad_output, x, kernel_size, output_size, indices):
    return x.new_empty(x.shape, dtype=grad_output.dtype)


PER_PLANE.update(_BACKWARD)
register_rule(*_BACKWARD)(pooling_rule)


@register_rule(*_FORWARD)
def fractional_max_pool_rule(op: OpSchema) -> Sharding:
    x, samples = op.spec("self"), op.spec("random_samples")
    if x is None or samples is None:  # a plain 0-d tensor somewhere: not the shapes this rule reads
        return replicate_all(op, num_outputs=2)
    num_leading = x.ndim - _FORWARD[op.func]
    # input leading dim -> the samples dim holding the same planes: (N, C) -> (0, 1); unbatched (C,) -> 1
    to_samples = {0: 0, 1: 1} if num_leading == 2 else {0: 1}
    to_input = {e: d for d, e in to_samples.items()}
    x_targets, sample_targets = [], []
    for px, ps in zip(x.placements, samples.placements):
        if isinstance(px, Shard) and px.dim in to_samples:
            x_targets.append(px)
            sample_targets.append(Shard(to_samples[px.dim]))
        elif isinstance(ps, Shard) and ps.dim in to_input:
            x_targets.append(Shard(to_input[ps.dim]))
            sample_targets.append(ps)
        else:
            x_targets.append(Replicate())
            sample_targets.append(Replicate())
    metas = meta_outputs(op)
    local_op = _skip_empty(op.func, tuple(x.shape[:num_leading]), metas)
    return Sharding(inputs={"self": tuple(x_targets), "random_samples": tuple(sample_targets)},
                    outputs=(tuple(x_targets),) * 2,
                    local_op=local_op)

"""Upsampling (nearest, linear, bilinear, bicubic, trilinear, antialiased), reflection and replication pads, and
pixel (un)shuffle, forward and backward: like pooling, each leading (batch, channel) index is resampled on its
own, so pooling.py's per-mesh-dim decision applies as it is (a leading dim sharded: local; Partial(sum | avg) on
the linear argument: kept, every one of these is linear in it; a spatial dim sharded: gathered). pixel_shuffle
mixes channels with the two spatial dims, so for it only the batch dims lead (three "spatial" dims).
"""

from __future__ import annotations

import dataclasses

from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten
from .pooling import PER_PLANE, pooling_rule

_RESAMPLING = {aten.pixel_shuffle.default: (3, "self"), aten.pixel_unshuffle.default: (3, "self")}
for _name, _num_spatial in [
    ("upsample_nearest1d", 1), ("upsample_nearest2d", 2), ("upsample_nearest3d", 3),
    ("_upsample_nearest_exact1d", 1), ("_upsample_nearest_exact2d", 2), ("_upsample_nearest_exact3d", 3),
    ("upsample_linear1d", 1), ("upsample_bilinear2d", 2), ("upsample_bicubic2d", 2), ("upsample_trilinear3d", 3),
    ("_upsample_bilinear2d_aa", 2), ("_upsample_bicubic2d_aa", 2),
    ("reflection_pad1d", 1), ("reflection_pad2d", 2), ("reflection_pad3d", 3),
    ("replication_pad1d", 1), ("replication_pad2d", 2), ("replication_pad3d", 3),
]:
    for _suffix, _linear in (("", "self"), ("_backward", "grad_output")):  # the values: linear in them
        _RESAMPLING[getattr(aten, _name + _suffix).default] = (_num_spatial, _linear)

_UPSAMPLE_BACKWARDS = [op for op in _RESAMPLING if "upsample" in str(op) and "backward" in str(op)]
PER_PLANE.update(_RESAMPLING)
register_rule(*[op for op in _RESAMPLING if op not in _UPSAMPLE_BACKWARDS])(pooling_rule)


@register_rule(*_UPSAMPLE_BACKWARDS)
def upsample_backward_rule(op: OpSchema) -> Sharding:
    """pooling_rule's decision; the local op also gets ``input_size`` (the global shape of the gradient it
    returns) with this rank's leading sizes, taken from its block of grad_output."""
    sharding = pooling_rule(op)
    num_spatial, inner = PER_PLANE[op.func][0], sharding.local_op

    def local_op(grad_output, output_size, input_size, *rest, **kwargs):
        leading = len(input_size) - num_spatial
        return inner(grad_output, output_size, list(grad_output.shape[:leading]) + list(input_size[leading:]), *rest, **kwargs)

    return dataclasses.replace(sharding, local_op=local_op)

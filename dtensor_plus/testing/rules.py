"""Rules as pure functions: what a registered rule decides for given layouts, with no ranks and no data.

    inputs, outputs = decide(aten.mm.default, ((8, 4), (Shard(0),)), ((4, 6), (Replicate(),)))
    assert outputs == ((Shard(0),),)
"""

from __future__ import annotations

import torch

from ..rules import OpSchema, rule_for
from ..spec import DTensorSpec, TensorMeta

__all__ = ["MeshShape", "spec", "decide"]


class MeshShape:
    """Just enough of a mesh for a rule, which reads only the shape."""

    def __init__(self, shape):
        self.shape, self.ndim = tuple(shape), len(shape)


def spec(mesh, shape, placements, dtype=torch.float32) -> DTensorSpec:
    stride = torch.empty(shape, device="meta").stride()
    return DTensorSpec(mesh, tuple(placements), TensorMeta(torch.Size(shape), stride, dtype))


def decide(func, *args, mesh_shape=(4,), **kwargs):
    """(input placements, output placements) that ``func``'s rule picks. Tensor arguments are given as
    (shape, placements) or (shape, placements, dtype) tuples; anything else passes through. Inputs the rule leaves alone report their
    own placements."""
    mesh = MeshShape(mesh_shape)
    schema_args = tuple(spec(mesh, *a) if isinstance(a, tuple) and len(a) in (2, 3) and isinstance(a[1], tuple) else a for a in args)
    specs = tuple(a for a in schema_args if isinstance(a, DTensorSpec))
    schema = OpSchema(func, schema_args, kwargs, specs)
    sharding = rule_for(func)(schema)
    inputs = [tuple(t) if t is not None else s.placements for t, s in zip(sharding.inputs_for(schema), specs)]
    return inputs, tuple(tuple(o) if o is not None else None for o in sharding.outputs)

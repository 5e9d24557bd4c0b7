"""_local_scalar_dense: ``.item()`` of a one-element DTensor, a Python number on every rank.

Per mesh dim, by the input's placement there:

    Replicate     read locally, no communication
    Shard(d)      Replicate: the one element lives on a single rank (the others hold empty blocks), so an
                  all-gather of at most one element per rank brings it everywhere
    Partial(op)   Replicate: one all-reduce of one element

The output is no tensor, so the rule lists none. NOTE: a rule alone does not lift the op off the fallback:
the dispatcher also needs the op's output metadata, which running ``item()`` on meta tensors cannot give;
it must treat an op whose schema returns no Tensor as having no outputs to describe (see the session report).
"""

from __future__ import annotations

from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, replicated


@register_rule(aten._local_scalar_dense.default)
def local_scalar_dense_rule(op: OpSchema) -> Sharding:
    return Sharding(inputs=(replicated(len(op.mesh_shape)),), outputs=())

"""Small helpers shared by the rule files: dimension bookkeeping, meta runs, and the placement-tuple helpers
(``replicated``, ``without_partial``, ``unshard_dims``) re-exported from ``dtensor_plus.placement_tuples``."""

from __future__ import annotations

import torch

from dtensor_plus.placement_tuples import replicated, unshard_dims, without_partial  # noqa: F401  (re-exported)
from dtensor_plus.rules import OpSchema, Sharding, meta_for
from dtensor_plus.spec import DTensorSpec

aten = torch.ops.aten


def replicate_all(op: OpSchema, num_outputs: int = 1) -> Sharding:
    """Every input gathered, every output replicated: the always-correct answer."""
    r = replicated(len(op.mesh_shape))
    return Sharding(inputs=(r,) * len(op.specs), outputs=(r,) * num_outputs)


def num_tensor_outputs(func) -> int:
    return sum(1 for r in func._schema.returns if "Tensor" in str(r.type))


def normalize_dim(dim: int, ndim: int) -> int:
    return dim % max(ndim, 1) if dim < 0 else dim


def local_numel(spec: DTensorSpec) -> float:
    n = spec.shape.numel()
    for k, p in enumerate(spec.placements):
        if p.is_shard():
            n /= spec.mesh.shape[k]
    return n


def meta_outputs(op: OpSchema) -> list[torch.Tensor]:
    """The op's tensor outputs run on meta tensors of the global shapes (pure metadata: shapes and dtypes)."""

    def meta(value):
        if isinstance(value, DTensorSpec):
            return torch.empty(value.shape, dtype=value.dtype, device="meta")
        if isinstance(value, torch.Tensor):  # a plain 0-d tensor (a replicated scalar)
            return value.to("meta")
        if type(value) is list or type(value) is tuple:
            return type(value)(meta(v) for v in value)
        return value

    run = meta_for(op.func) or op.func
    out = run(*meta(op.args), **{k: meta(v) for k, v in op.kwargs.items()})
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in outs if isinstance(t, torch.Tensor)]


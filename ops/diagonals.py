"""Diagonals: ``diagonal`` (and its copy), ``diagonal_backward``, ``diag_embed`` and ``diagonal_scatter``.

``diagonal(x, offset, dim1, dim2)`` drops dim1 and dim2 and appends the diagonal as the last dim; the other
(batch) dims keep their order. Per mesh dim:

    diagonal / diagonal_copy   Shard of a batch dim -> Shard of its new number; a Shard of dim1 or dim2
                               gives Partial(sum): each rank writes the diagonal elements inside its block
                               into zeros (an all-reduce of the diagonal later, where a gather of the matrix
                               would come now); with a Partial input too, that mesh dim is gathered instead
    diagonal_backward          the same map read backwards (grad's batch dims -> input dims); a Shard of the
                               diagonal dim is gathered
    diag_embed                 input batch dims -> output dims other than dim1/dim2; the embedded (last) dim
                               is gathered
    diagonal_scatter           self and src agree on a batch-dim Shard (whichever is sharded leads); a Shard of
                               dim1/dim2 of self or of src's diagonal dim is gathered

All of them move or zero-fill elements, so every Partial passes. diagonal_scatter is linear in (self, src)
together: it keeps a Partial both share, or one's Partial with the other's Replicate partitioned into it (free).
"""

from __future__ import annotations

import torch

from dtensor_plus.placements import Partial, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, normalize_dim, replicated
from .shape_ops import block, moved


def _batch_dims(ndim: int, dim1: int, dim2: int) -> list[int]:
    d1, d2 = normalize_dim(dim1, ndim), normalize_dim(dim2, ndim)
    return [d for d in range(ndim) if d not in (d1, d2)]


@register_rule(aten.diagonal.default, aten.diagonal_copy.default)
def diagonal_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    offset = op.arg("offset", 0)
    d1, d2 = normalize_dim(op.arg("dim1", 0), spec.ndim), normalize_dim(op.arg("dim2", 1), spec.ndim)
    batch = _batch_dims(spec.ndim, d1, d2)
    inputs, outputs = moved(spec.placements, {d: i for i, d in enumerate(batch)})
    matrix_mesh_dims = [k for k, p in enumerate(spec.placements) if p.is_shard(d1) or p.is_shard(d2)]
    if not matrix_mesh_dims or spec.has_partial():  # (no mixing of Partial kinds in one output)
        return Sharding(inputs=(inputs,), outputs=(outputs,))
    # A sharded matrix dim: each rank takes the diagonal elements inside its block and zeros elsewhere, a
    # Partial(sum) of the (small) diagonal instead of a gather of the (large) matrix, as select does.
    inputs = tuple(spec.placements[k] if k in matrix_mesh_dims else p for k, p in enumerate(inputs))
    outputs = tuple(Partial() if k in matrix_mesh_dims else p for k, p in enumerate(outputs))
    length = torch.empty(tuple(spec.shape), device="meta").diagonal(offset, d1, d2).shape[-1]
    local_op = _owned_diagonal(spec.shape, spec.mesh, inputs, offset, d1, d2, length)
    return Sharding(inputs=(inputs,), outputs=(outputs,), local_op=local_op)


def _owned_diagonal(shape, mesh, placements, offset: int, d1: int, d2: int, length: int):
    def local_op(x, *args, **kwargs):
        # Global (i, j) is local (i - r0, j - c0): the global diagonal j - i = offset is the local one at
        # offset + r0 - c0, and its first element in this block is global diagonal index r0 + max(-local, 0)
        # - max(-offset, 0).
        r0, _ = block(shape, mesh, placements, d1)
        c0, _ = block(shape, mesh, placements, d2)
        local_offset = offset + r0 - c0
        owned = aten.diagonal.default(x, local_offset, d1, d2)
        out = owned.new_zeros((*owned.shape[:-1], length))
        start = r0 + max(-local_offset, 0) - max(-offset, 0)
        out.narrow(-1, start if owned.shape[-1] else 0, owned.shape[-1]).copy_(owned)
        return out

    return local_op


@register_rule(aten.diagonal_backward.default)
def diagonal_backward_rule(op: OpSchema) -> Sharding:
    spec, sizes = op.specs[0], op.arg("input_sizes")
    batch = _batch_dims(len(sizes), op.arg("dim1"), op.arg("dim2"))
    inputs, outputs = moved(spec.placements, dict(enumerate(batch)))
    return Sharding(inputs=(inputs,), outputs=(outputs,), shape_arg=1)


@register_rule(aten.diag_embed.default)
def diag_embed_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    batch = _batch_dims(spec.ndim + 1, op.arg("dim1", -2), op.arg("dim2", -1))
    inputs, outputs = moved(spec.placements, dict(enumerate(batch[: spec.ndim - 1])))
    return Sharding(inputs=(inputs,), outputs=(outputs,))


def scatter_placements(p, q, self_to_src: dict[int, int]):
    """(self, src, output) placements on one mesh dim of a scatter of src into a view of self whose dims map
    ``self_to_src`` (self dims absent from it, the dims the view consumes, are gathered)."""
    src_to_self = {s: d for d, s in self_to_src.items()}
    if isinstance(p, Shard) and p.dim in self_to_src:
        return p, Shard(self_to_src[p.dim]), p
    if p.is_replicate() and isinstance(q, Shard) and q.dim in src_to_self:
        return Shard(src_to_self[q.dim]), q, Shard(src_to_self[q.dim])
    partials = {x for x in (p, q) if x.is_partial()}
    if len(partials) == 1 and all(x.is_partial() or x.is_replicate() for x in (p, q)):
        partial = partials.pop()
        return partial, partial, partial
    return Replicate(), Replicate(), Replicate()


@register_rule(aten.diagonal_scatter.default)
def diagonal_scatter_rule(op: OpSchema) -> Sharding:
    spec, src = op.spec("self"), op.spec("src")  # src None: a plain 0-d tensor, whole on every rank
    batch = _batch_dims(spec.ndim, op.arg("dim1", 0), op.arg("dim2", 1))
    src_placements = src.placements if src is not None else replicated(len(op.mesh_shape))
    rows = [scatter_placements(p, q, {d: i for i, d in enumerate(batch)})
            for p, q in zip(spec.placements, src_placements)]
    self_t, src_t, output = (tuple(column) for column in zip(*rows))
    inputs = {"self": self_t, "src": src_t} if src is not None else {"self": self_t}
    return Sharding(inputs=inputs, outputs=(output,))

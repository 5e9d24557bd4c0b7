"""Embedding lookup (``aten.embedding``) and its dense backward (``aten.embedding_dense_backward``).

Forward, per mesh dim; weight (V, D), indices (*), output (*, D):

    weight             indices      output          local op
    Replicate          Shard(d)     Shard(d)        embedding
    Replicate          Replicate    Replicate       embedding
    Shard(1)           Replicate    Shard(-1)       embedding (this rank's columns)
    Shard(0)           Replicate    Partial(sum)    masked lookup: rows outside this rank's vocab range are 0
    Partial(sum|avg)   Replicate    Partial(same)   embedding (a row gather is linear)

Indices must be Replicate along a mesh dim that shards or partials the weight (gathering ints is cheap).

Backward, per mesh dim; grad (*, D), indices (*), grad_weight (V, D):

    grad               indices      grad_weight
    Shard(-1)          Replicate    Shard(1)
    Shard(d)           Shard(d)     Partial(sum)    (a Replicate side is chunked to match: free)
    Partial(sum|avg)   Replicate    Partial(same)   (the scatter-add is linear in grad)
    Replicate          Replicate    Shard(0)        masked scatter: each rank writes only its own vocab rows

The backward cannot see the weight's layout. Replicate/Replicate gives Shard(0), the layout a vocab-sharded
weight wants (Megatron); a Replicate weight with replicated indices on that mesh dim then receives a Shard(0)
gradient, which is right but costs an all-gather where it meets the weight. ``scale_grad_by_freq`` divides by
counts over *all* indices, so it keeps the indices whole (Replicate on every mesh dim). A plain 0-d index
(checked equal on every rank by the dispatcher) reads as Replicate indices of 0 dims.
"""

from __future__ import annotations

from dtensor_plus.placements import Partial, Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import local_shape_and_offset

from .common import aten, replicated

_LINEAR_PARTIALS = ("sum", "avg")  # reductions that commute with gathering or scatter-adding rows


def _lookup_placements(weight: Placement, indices: Placement, indices_ndim: int):
    """(weight, indices, output) placements on one mesh dim of the forward lookup."""
    if weight.is_partial() and weight.reduce_op in _LINEAR_PARTIALS:
        return weight, Replicate(), weight
    if isinstance(weight, Shard):
        output = Partial() if weight.dim == 0 else Shard(indices_ndim)
        return weight, Replicate(), output
    if isinstance(indices, Shard):
        return Replicate(), indices, indices
    return Replicate(), Replicate(), Replicate()


def _indices(op: OpSchema) -> tuple[tuple[Placement, ...], int, bool]:
    """(placements, ndim, is a DTensor) of the indices: a plain 0-d index (``torch.tensor(3)``, checked equal on
    every rank by the dispatcher) is not among ``op.specs`` and reads as Replicate."""
    indices = op.spec("indices")
    if indices is not None:
        return indices.placements, indices.ndim, True
    return replicated(len(op.mesh_shape)), 0, False


def _inputs(name: str, first, indices_p, indices_is_dtensor: bool) -> dict:
    return {name: first, "indices": indices_p} if indices_is_dtensor else {name: first}


@register_rule(aten.embedding.default, strided="as_shard")  # rows of indices are independent
def embedding_rule(op: OpSchema) -> Sharding:
    weight_spec = op.spec("weight")
    indices_placements, indices_ndim, indices_is_dtensor = _indices(op)
    chosen = [
        _lookup_placements(w, i, indices_ndim) for w, i in zip(weight_spec.placements, indices_placements)
    ]
    weight_p, indices_p, output_p = (tuple(column) for column in zip(*chosen))
    local_op = None
    if any(p.is_shard(0) for p in weight_p):
        local_op = _masked_lookup(weight_spec.with_placements(weight_p))
    return Sharding(inputs=_inputs("weight", weight_p, indices_p, indices_is_dtensor), outputs=(output_p,),
                    local_op=local_op)


def _masked_lookup(weight_spec):
    """Lookup in a vocab-sharded weight: this rank's rows, zeros for indices it does not own."""

    def local_op(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
        # padding_idx only affects the backward; the lookup itself ignores it.
        (num_rows, _), (start, _) = weight_spec.local_shape_and_offset()
        if num_rows == 0:  # an empty vocab shard (vocab smaller than the mesh dim) owns nothing
            return weight.new_zeros((*indices.shape, weight.shape[1]))
        local = indices - start
        outside = (local < 0) | (local >= num_rows)
        out = aten.embedding(weight, local.masked_fill(outside, 0))
        return out.masked_fill(outside.unsqueeze(-1), 0)

    return local_op


def _backward_placements(grad: Placement, indices: Placement, grad_ndim: int, whole_indices: bool):
    """(grad, indices, grad_weight) placements on one mesh dim of embedding_dense_backward."""
    embed_dim = grad_ndim - 1
    if grad.is_partial() and grad.reduce_op in _LINEAR_PARTIALS:
        return grad, Replicate(), grad
    if isinstance(grad, Shard) and grad.dim == embed_dim:
        return grad, Replicate(), Shard(1)
    if not whole_indices:
        if isinstance(grad, Shard):
            return grad, grad, Partial()
        if isinstance(indices, Shard):
            return indices, indices, Partial()
    return Replicate(), Replicate(), Shard(0)


@register_rule(aten.embedding_dense_backward.default, strided="as_shard")  # rows of indices are independent
def embedding_dense_backward_rule(op: OpSchema) -> Sharding:
    grad_spec = op.spec("grad_output")
    indices_placements, _, indices_is_dtensor = _indices(op)
    num_weights = op.arg("num_weights")
    scale_grad_by_freq = op.arg("scale_grad_by_freq")
    chosen = [
        _backward_placements(g, i, grad_spec.ndim, scale_grad_by_freq or not indices_is_dtensor)
        for g, i in zip(grad_spec.placements, indices_placements)
    ]
    grad_p, indices_p, output_p = (tuple(column) for column in zip(*chosen))
    local_op = None
    if any(p.is_shard(0) for p in output_p):
        local_op = _masked_scatter(op.mesh, output_p, (num_weights, grad_spec.shape[-1]))
    return Sharding(inputs=_inputs("grad_output", grad_p, indices_p, indices_is_dtensor), outputs=(output_p,),
                    local_op=local_op)


def _masked_scatter(mesh, output_placements, output_shape):
    """Dense backward into this rank's vocab rows only; other ranks' indices land in a dropped extra row."""

    def local_op(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
        coordinate = mesh.get_coordinate()
        (num_rows, _), (start, _) = local_shape_and_offset(output_shape, mesh.shape, output_placements, coordinate)
        local = indices - start
        outside = (local < 0) | (local >= num_rows)
        local_padding = padding_idx - start if 0 <= padding_idx - start < num_rows and padding_idx >= 0 else -1
        # With scale_grad_by_freq the indices are whole here, so the counts of this rank's rows are the global ones.
        out = aten.embedding_dense_backward(
            grad_output, local.masked_fill(outside, num_rows), num_rows + 1, local_padding, scale_grad_by_freq
        )
        return out[:num_rows]

    return local_op

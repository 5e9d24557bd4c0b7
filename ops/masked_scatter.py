"""``masked_scatter`` (and ``masked_scatter_``) and its backward ``masked_scatter_backward``.

masked_scatter(self, mask, source) writes source's elements, in order, into the positions where mask is True,
taken row-major over the whole result (the broadcast of self and mask). A position's source element is the
count of True mask elements before it: a prefix count over the *global* mask. We keep the mask whole
(Replicate: one byte an element, the cheapest input to move) so that every rank computes the prefix count
itself, with no collective inside the op; self stays sharded. (A sharded mask would need an exclusive scan of
the per-rank counts across ranks, a collective that a rule's local op may not run.)

masked_scatter_backward(grad, mask, sizes) is the reverse: the gradient at the True positions, in order, into a
zero tensor of source's shape.

    masked_scatter
    self Shard(d) at full size, or       Shard(o) of the result; self follows where it spans o at full size;
      mask Shard(d) (self Replicate)     mask and source Replicate
    self, source Partial(r)              Partial(r), mask Replicate: the result is a selection from (self,
                                         source) jointly, so every r passes
    masked_scatter_backward
    grad Shard(d)                        Partial(sum): each rank places its block's True positions, zeros
                                         elsewhere (exact: one nonzero term per element)
    grad Partial(sum | avg)              the same Partial: linear in grad
    anything else                        Replicate
"""

from __future__ import annotations

import dataclasses
import math

import torch

from dtensor_plus.placements import Partial, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import DTensorSpec, TensorMeta

from .common import aten, replicate_all
from .flat_indexing import local_block
from .indexing import _ANY, _partial


def _spans(spec: DTensorSpec, out_shape, o: int) -> int | None:
    """``spec``'s dim lying on result dim ``o`` (right-aligned) at full size, else None."""
    dim = o - (len(out_shape) - spec.ndim)
    return dim if dim >= 0 and spec.shape[dim] == out_shape[o] else None


def _result_dim(p, spec: DTensorSpec, out_shape) -> int | None:
    if not p.is_shard():
        return None
    o = p.dim + len(out_shape) - spec.ndim
    return o if _spans(spec, out_shape, o) == p.dim else None


def _order(mask: torch.Tensor, out_shape, out_target: DTensorSpec):
    """(mask, order) on this rank's block of the result: order is each position's count of True mask elements
    before it in the whole result, row-major (the source element it takes where mask is True)."""
    whole = mask.expand(out_shape)
    order = (torch.cumsum(whole.reshape(-1), 0) - 1).reshape(out_shape)
    sizes, offsets = local_block(out_target)
    for d, (size, offset) in enumerate(zip(sizes, offsets)):
        if size != out_shape[d]:
            whole, order = whole.narrow(d, offset, size), order.narrow(d, offset, size)
    return whole, order


@register_rule(aten.masked_scatter.default, aten.masked_scatter_.default)
def masked_scatter_rule(op: OpSchema) -> Sharding:
    spec, mask, source = op.spec("self"), op.spec("mask"), op.spec("source")
    if spec is None or mask is None or source is None:  # a plain 0-d tensor among them
        return replicate_all(op)
    out_shape = tuple(torch.broadcast_shapes(spec.shape, mask.shape))
    R = Replicate()
    rows = []
    for p, m, s in zip(spec.placements, mask.placements, source.placements):
        o = _result_dim(p, spec, out_shape)
        o = o if o is not None else _result_dim(m, mask, out_shape) if p.is_replicate() else None
        if o is not None:
            dim = _spans(spec, out_shape, o)
            rows.append((R if dim is None else Shard(dim), R, R, Shard(o)))
            continue
        kept = _partial([p, s], _ANY)
        rows.append((kept, R, kept, kept) if kept else (R, R, R, R))
    self_t, mask_t, source_t, output = (tuple(column) for column in zip(*rows))
    sharding = Sharding(inputs={"self": self_t, "mask": mask_t, "source": source_t}, outputs=(output,))
    if not any(p.is_shard() for p in output):
        return sharding
    inplace = op.func is aten.masked_scatter_.default
    out_target = DTensorSpec(spec.mesh, output, TensorMeta.of(torch.empty(out_shape, device="meta")))

    def local_masked_scatter(x, mask, source):
        whole, order = _order(mask, out_shape, out_target)
        flat = source.reshape(-1)
        if int(mask.expand(out_shape).sum()) > flat.numel():  # NOTE: device-to-host sync, as on one device
            raise RuntimeError("masked_scatter: Number of elements of source < number of ones in mask")
        if flat.numel() == 0:  # no True in the mask (checked above): nothing is written
            return x if inplace else x.expand(whole.shape).clone()
        result = torch.where(whole, flat[order.clamp(0, flat.numel() - 1)], x)
        return x.copy_(result) if inplace else result

    return dataclasses.replace(sharding, local_op=local_masked_scatter)


@register_rule(aten.masked_scatter_backward.default)
def masked_scatter_backward_rule(op: OpSchema) -> Sharding:
    grad, mask = op.spec("grad_output"), op.spec("mask")
    if grad is None or mask is None:  # a plain 0-d tensor among them
        return replicate_all(op)
    out_shape = tuple(torch.broadcast_shapes(grad.shape, mask.shape))
    if tuple(grad.shape) != out_shape:  # a grad smaller than the mask: no block of the result to place
        return replicate_all(op)
    summable = grad.dtype != torch.bool
    R = Replicate()
    rows = []
    for p in grad.placements:
        if p.is_shard() and summable:
            rows.append((p, R, Partial()))
        elif p.is_partial() and (p.reduce_op == "sum" or (p.reduce_op == "avg" and grad.dtype.is_floating_point)):
            rows.append((p, R, p))
        else:
            rows.append((R, R, R))
    grad_t, mask_t, output = (tuple(column) for column in zip(*rows))
    inputs = {"grad_output": grad_t, "mask": mask_t}
    if not any(p.is_shard() for p in grad_t):
        return Sharding(inputs=inputs, outputs=(output,))
    grad_target = grad.with_placements(grad_t)

    def local_backward(grad, mask, sizes):
        whole, order = _order(mask, out_shape, grad_target)
        out = grad.new_zeros(math.prod(sizes))
        out[order[whole]] = grad[whole]
        return out.view(sizes)

    return Sharding(inputs=inputs, outputs=(output,), local_op=local_backward)

"""Loss functions that reach dispatch as their own aten ops: nll_loss (what F.cross_entropy runs after
_log_softmax) and the elementwise losses (mse, smooth_l1, huber, binary_cross_entropy[_with_logits],
soft_margin), forward and backward. l1_loss, kl_div, soft-target cross_entropy and the backward of
binary_cross_entropy_with_logits decompose into pointwise ops and reductions before dispatch: nothing here.

Elementwise losses: inputs are laid out as for a pointwise op (``ops.pointwise``); with B = the global
number of elements:

    reduction    output on a sharded mesh dim    local op
    none         Shard (as the pointwise op)     the loss
    sum          Partial(sum)                    the loss, reduction='sum'
    mean         Partial(sum)                    the loss, reduction='sum', divided by the global B
    backward     Shard (as the input)            mean: backward with reduction='sum', divided by B

so a mean over uneven shards is exact (a Partial(avg) of shard means would weigh short shards too much).

nll_loss / nll_loss2d: input (N, C, *) or (C,), target (N, *) or (). The class dim C is always Replicate;
batch dims (N and the spatial ones) are sharded alike in input and target (a Replicate input is chunked to
match a sharded target: free). Per mesh dim that shards a batch dim:

    reduction    target       output          total_weight     local op
    none         Shard        Shard           Replicate (0)    nll_loss
    sum          Shard        Partial(sum)    Partial(sum)     nll_loss
    mean         Shard        Partial(sum)    Replicate        local sum / global total weight
    backward     Shard        grad_input Shard; grad_output and total_weight Replicate (sum/mean)

For mean, each rank sums weight[target] over its own targets != ignore_index and one all-reduce of that
scalar (4 bytes, on each mesh dim sharding the batch) gives every rank the global total weight; it divides its
local sum by it: exact for uneven and empty shards, and the targets never move. The rule declares that
all-reduce (``AllReduce``); the local op runs it through the ``comm`` it is handed, unless the targets came
from ``shard_batch`` (through views and copies): every rank then holds them whole (``dtensor_plus.whole_batch``)
and counts the global total weight itself, with no collective (the rule's ``whole_batch_of="target"``). The backward kernel already
divides by the total_weight it is given, which is the global one.
"""

from __future__ import annotations

import dataclasses

import torch

from dtensor_plus.declared import AllReduce
from dtensor_plus.placements import Partial, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import DTensorSpec

from .common import aten, replicated
from .pointwise import pointwise_rule

NONE, MEAN, SUM = 0, 1, 2  # at::Reduction

# -- elementwise losses ---------------------------------------------------------------------------------

_ELEMENTWISE_FORWARD = (
    aten.mse_loss.default,
    aten.smooth_l1_loss.default,
    aten.huber_loss.default,
    aten.binary_cross_entropy.default,
    aten.binary_cross_entropy_with_logits.default,
    aten.soft_margin_loss.default,
)
_ELEMENTWISE_BACKWARD = (
    aten.mse_loss_backward.default,
    aten.smooth_l1_loss_backward.default,
    aten.huber_loss_backward.default,
    aten.binary_cross_entropy_backward.default,
    aten.soft_margin_loss_backward.default,
)


def _reduction_index(func) -> int:
    return [a.name for a in func._schema.arguments].index("reduction")


def _is_sharded(placements) -> bool:
    return any(p.is_shard() for p in placements)


@register_rule(*_ELEMENTWISE_FORWARD)
def elementwise_loss_rule(op: OpSchema) -> Sharding:
    base = pointwise_rule(op)  # the unreduced loss is a pointwise op of its inputs
    reduction = op.arg("reduction", MEAN)
    laid_out = base.outputs[0]
    if reduction == NONE or not _is_sharded(laid_out):
        return dataclasses.replace(base, outputs=(laid_out,))
    partial = tuple(Partial() if p.is_shard() else Replicate() for p in laid_out)
    count = torch.broadcast_shapes(*(s.shape for s in op.specs)).numel()  # what the mean divides by
    local_op = _sum_divided_by(op.func, count) if reduction == MEAN else None
    return dataclasses.replace(base, outputs=(partial,), local_op=local_op)


@register_rule(*_ELEMENTWISE_BACKWARD)
def elementwise_loss_backward_rule(op: OpSchema) -> Sharding:
    base = pointwise_rule(op)  # grad_input is pointwise in (grad_output, self, target, ...)
    if op.arg("reduction", MEAN) != MEAN or not _is_sharded(base.outputs[0]):
        return base
    self_spec = op.spec("self")  # the kernel divides by self.numel(): the global count here
    return dataclasses.replace(base, local_op=_sum_divided_by(op.func, self_spec.shape.numel()))


def _sum_divided_by(func, count: int):
    """``func`` with reduction='sum' on the local block, divided by the global element count."""
    reduction_index = _reduction_index(func)  # the local op gets the arguments as the call passed them

    def local_op(*args, **kwargs):
        if reduction_index < len(args):
            args = args[:reduction_index] + (SUM,) + args[reduction_index + 1 :]
        else:
            kwargs = dict(kwargs, reduction=SUM)
        return func(*args, **kwargs) / count  # count 0 gives nan, as the mean of nothing does

    return local_op


# -- nll_loss -------------------------------------------------------------------------------------------


def _class_dim(ndim: int) -> int:
    return 1 if ndim >= 2 else 0


def _target_dim(input_dim: int) -> int:
    return 0 if input_dim == 0 else input_dim - 1  # target (N, *) lacks the class dim of input (N, C, *)


def _input_dim(target_dim: int) -> int:
    return 0 if target_dim == 0 else target_dim + 1


def _batch_placements(self_spec: DTensorSpec, target_spec: DTensorSpec):
    """Per mesh dim, the placements of input and target: the input's batch Shard, else the target's, else
    Replicate (the class dim and Partial inputs are made whole)."""
    class_dim = _class_dim(self_spec.ndim)
    self_p, target_p = [], []
    for sp, tp in zip(self_spec.placements, target_spec.placements):
        if isinstance(sp, Shard) and sp.dim != class_dim:
            self_p.append(sp)
            target_p.append(Shard(_target_dim(sp.dim)))
        elif isinstance(tp, Shard) and self_spec.ndim >= 2:
            self_p.append(Shard(_input_dim(tp.dim)))
            target_p.append(tp)
        else:
            self_p.append(Replicate())
            target_p.append(Replicate())
    return tuple(self_p), tuple(target_p)


def nll_forward_layouts(op: OpSchema, self_p, target_p, whole) -> dict:
    """Layouts of nll_loss's DTensor arguments by name, given where self's and target's rows live."""
    wanted = {"self": self_p, "target": target_p, "weight": whole}
    return {name: wanted[name] for name in op.names}  # the class weight may be None


@register_rule(aten.nll_loss_forward.default, aten.nll_loss2d_forward.default, strided="as_shard")
def nll_loss_forward_rule(op: OpSchema) -> Sharding:
    reduction = op.arg("reduction")
    self_p, target_p = _batch_placements(op.spec("self"), op.spec("target"))
    whole = replicated(len(op.mesh_shape))
    inputs = nll_forward_layouts(op, self_p, target_p, whole)
    if reduction == NONE:  # total_weight is 0 for reduction='none'
        return Sharding(inputs=inputs, outputs=(target_p, whole))
    partial = tuple(Partial() if p.is_shard() else Replicate() for p in self_p)
    # A Shard on a mesh dim of one rank holds the whole batch: the kernel's own mean is the mean there.
    batch_mesh_dims = tuple(k for k, p in enumerate(self_p) if p.is_shard() and op.mesh_shape[k] > 1)
    if reduction == SUM or not batch_mesh_dims:
        return Sharding(inputs=inputs, outputs=(partial, partial))
    return Sharding(inputs=inputs, outputs=(partial, whole), local_op=_nll_mean(op.func),
                    communication=(AllReduce(batch_mesh_dims, ("sum",)),), whole_batch_of="target")


def _nll_mean(func):
    """Mean nll over a batch-sharded input: local sum / global total weight (one scalar all-reduced, or counted
    on the whole targets where every rank holds them: ``dtensor_plus.whole_batch``)."""

    def local_op(self, target, weight, reduction, ignore_index, *, comm, whole_batch=None):
        # The kernel's second output is this rank's total weight (weight[target] over kept targets).
        local_sum, total_weight = func(self, target, weight, SUM, ignore_index)
        if whole_batch is not None:
            total_weight = _total_weight(whole_batch, weight, ignore_index).to(total_weight.dtype)
        else:
            total_weight = comm.all_reduce(total_weight, "sum")  # the declared mesh dims; 1-rank ones skipped
        return local_sum / total_weight, total_weight  # total 0 gives nan, as on one device

    return local_op


def _total_weight(targets: torch.Tensor, weight: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """What nll_loss's mean divides by, over ``targets``: the count of kept targets, or their class weights' sum."""
    kept = targets != ignore_index
    if weight is None:
        return kept.sum()
    return weight.index_select(0, targets[kept]).sum()


def nll_backward_layouts(op: OpSchema, reduction: int, self_p, target_p, whole) -> dict:
    """Layouts of nll_loss_backward's DTensor arguments by name, given where self's and target's rows live."""
    wanted = {
        "grad_output": target_p if reduction == NONE else whole,
        "self": self_p,
        "target": target_p,
        "weight": whole,
        # Only the mean reads total_weight (the global one, Replicate since the forward); else leave it be.
        "total_weight": whole if reduction == MEAN else None,
    }
    return {name: wanted[name] for name in op.names}  # weight (and a plain total_weight) may not be DTensors


@register_rule(aten.nll_loss_backward.default, aten.nll_loss2d_backward.default, strided="as_shard")
def nll_loss_backward_rule(op: OpSchema) -> Sharding:
    reduction = op.arg("reduction")
    self_p, target_p = _batch_placements(op.spec("self"), op.spec("target"))
    whole = replicated(len(op.mesh_shape))
    return Sharding(inputs=nll_backward_layouts(op, reduction, self_p, target_p, whole), outputs=(self_p,))

"""``loss_parallel()``: cross-entropy on class-sharded logits without gathering them.

A colwise-parallel lm head leaves the logits ``(N, V)`` sharded on the vocab dim (``Shard(1)``, or
``Shard(-1)`` of ``(B, T, V)`` viewed as ``(B*T, V)``). The default rules (ops/softmax.py, ops/losses.py)
make the class dim whole: an all-gather of N·V values. Inside ``loss_parallel()`` four rules are replaced,
through ``rules.override_rule`` (scoped, nesting; leaving the block restores the defaults):

    op                              class dim sharded on mesh dims K          communication on each k in K
    _log_softmax                    stays Shard(class)                        all_reduce max + sum of (N, 1)
    _log_softmax_backward_data      grad and output Shard(class)              all_reduce sum of (N, 1)
    nll_loss_forward                Partial(sum) on K; target Replicate on K  none (mean: as ops/losses.py)
    nll_loss_backward               grad_input Shard(class)                   none

Every other mesh dim keeps the default treatment (batch Shard stays, Partial is reduced), and an op whose
class dim is not sharded uses the rule that was in force when the block was entered.

Why a local op communicates here, and only here: log-softmax over a sharded class dim needs each row's
global max and log-sum-exp. The planner moves whole inputs between placements; it cannot express "reduce a
statistic in the middle of one op", and the dispatcher runs exactly one local op per aten op. So the
``_log_softmax`` rule (and its backward's) declares an all-reduce of the (N, 1) statistics (``AllReduce`` in
its Sharding's communication) and the local op runs it through the ``comm`` the executor hands it, counted by
``comm_mode`` like any collective. The bytes are O(N), never O(N·V) (this is also how PyTorch's
loss_parallel works). Nothing hangs: the rule depends only on global metadata (the specs), so every rank of
the mesh picks the same local op and issues the same all-reduces in the same order (mesh dims ascending).

nll_loss on a class block: each rank shifts the targets into its block (``target - offset``, the offset
read from the spec at run time: uneven and empty blocks are exact), sends targets outside its block and
ignored ones to the kernel's ignore_index, and runs the aten kernel with its slice of the class weights.
Exactly one rank of the class group holds each target, so the per-row losses are Partial(sum).

Example::

    logits = lm_head(h)                         # DTensor (B, T, V), [Shard(0), Shard(2)] on ("dp", "tp")
    with loss_parallel():
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1))
        loss.backward()

The fused path: ``parallel_cross_entropy(logits, target)`` computes the same loss in one pass over the local
logits (kernels/cross_entropy.py: per-row max, sum-exp and target logit, all-reduced over the class mesh dims,
then a backward that writes ``softmax - onehot`` without storing softmax). ``F.cross_entropy`` reaches the
DTensor as two aten ops (log-softmax, then nll_loss), which a rule cannot fuse, so the fused path is a function
of its own; with ``dtensor_plus.kernels.use_kernels`` on it runs the Triton kernel, else its torch reference.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from dtensor_plus import rules
from dtensor_plus.declared import AllReduce, Communicator
from dtensor_plus.dtensor import DTensor
from dtensor_plus.kernels.cross_entropy import cross_entropy as fused_cross_entropy
from dtensor_plus.ops.common import aten, normalize_dim, replicated, without_partial
from dtensor_plus.ops.losses import NONE, SUM, _batch_placements, nll_backward_layouts, nll_forward_layouts
from dtensor_plus.placements import Partial, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding
from dtensor_plus.spec import DTensorSpec

__all__ = ["loss_parallel", "parallel_cross_entropy"]

_LOCAL_IGNORE = -1  # the kernel's ignore_index for targets outside this rank's class block: never in [0, C)


@contextlib.contextmanager
def loss_parallel():
    """Compute F.cross_entropy / F.nll_loss on class-sharded logits without gathering the class dim.

    Inside the block, ``_log_softmax`` (+ backward) and ``nll_loss_forward`` (+ backward) on inputs whose
    class dim is sharded keep it sharded; only (N, 1) statistics are all-reduced. Targets (and optional class
    weights) are whole on the class mesh dims. Same values and gradients as one device.

    Example::

        with loss_parallel():
            F.cross_entropy(logits, target).backward()   # logits: Shard(1) on the tp mesh dim
    """
    overrides = {}
    for op, rule in _RULES.items():
        default = rules.rule_for(op)  # what was in force when the block was entered (nests)
        overrides[op] = functools.partial(rule, default=default)
    # Rows are independent in all four ops, so a StridedShard of the rows (a flattened (B, T) with T on cp)
    # may be read as a Shard of them; the class dim is always a plain Shard.
    # Its collectives (the vocab-wise max and sum) are asked for by name: allowed under explicit_communication().
    with rules.override_rule(overrides, strided="as_shard", asked_for=True):
        yield


def parallel_cross_entropy(logits, target, *, ignore_index: int = -100, reduction: str = "mean"):
    """``F.cross_entropy(logits, target)`` for (N, V) logits whose class dim may be sharded, fused.

    ``logits`` is a DTensor (class dim Shard(1) on the tp mesh dim(s), rows Shard(0) or Replicate on the
    others) or a plain tensor (one device). ``target`` (N,) is a DTensor or a plain tensor holding every row's
    class. Only (N,) statistics cross ranks: one all-reduce max and two all-reduce sums per class mesh dim.

    Example::

        with dtensor_plus.kernels.use_kernels(True):
            loss = parallel_cross_entropy(logits.flatten(0, 1), target.flatten(0, 1))
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"parallel_cross_entropy: reduction={reduction!r}; use 'none', 'sum' or 'mean'")
    if not isinstance(logits, DTensor):
        return fused_cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
    spec = logits._spec
    if spec.ndim != 2:
        raise ValueError(f"parallel_cross_entropy wants logits (N, V); got {tuple(spec.shape)}; flatten the batch dims")
    mesh = spec.mesh
    # the class dim stays sharded, rows keep a Shard(0), anything else (Partial, other shards) is made whole
    logit_p = tuple(p if p.is_shard(1) or p.is_shard(0) else Replicate() for p in spec.placements)
    row_p = tuple(Shard(0) if p.is_shard(0) else Replicate() for p in logit_p)
    if logit_p != spec.placements:
        logits = logits.redistribute(placements=logit_p)
    if not isinstance(target, DTensor):  # every rank holds all targets: taking its rows is free
        target = DTensor.from_local(target, mesh, replicated(mesh.ndim))
    target_local = target.redistribute(placements=row_p).to_local()
    block = spec.with_placements(logit_p)
    mesh_dims = _class_mesh_dims(block, 1)
    # Not a rule, but it communicates the same way: only what it declares, counted and audited as a rule's.
    comm = Communicator("parallel_cross_entropy", mesh, (AllReduce(mesh_dims, ("max", "sum", "sum")),))
    all_reduce = comm.all_reduce if mesh_dims else None
    rows_local = fused_cross_entropy(logits.to_local(), target_local, vocab_offset=block.local_shape_and_offset()[1][1],
                                     ignore_index=ignore_index, reduction="none", all_reduce=all_reduce)
    rows = DTensor.from_local(rows_local, mesh, row_p, shape=(spec.shape[0],))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    kept = DTensor.from_local((target_local != ignore_index).to(rows_local.dtype), mesh, row_p, shape=(spec.shape[0],))
    return rows.sum() / kept.sum()


# -- helpers --------------------------------------------------------------------------------------------


def _class_mesh_dims(spec: DTensorSpec, dim: int) -> tuple[int, ...]:
    """The mesh dims sharding ``dim``, ascending: the order every rank all-reduces over them."""
    return tuple(k for k, p in enumerate(spec.placements) if p.is_shard(dim))


# -- log_softmax ----------------------------------------------------------------------------------------


def _log_softmax_rule(op: OpSchema, default) -> Sharding:
    spec = op.specs[0]
    dim = normalize_dim(op.arg("dim"), spec.ndim)
    mesh_dims = _class_mesh_dims(spec, dim)
    if not mesh_dims:
        return default(op)
    target = without_partial(spec.placements)  # Shards stay (the class one too); Partial reduced
    return Sharding(inputs=(target,), outputs=(target,), local_op=_log_softmax_local,
                    communication=(AllReduce(mesh_dims, ("max", "sum")),))


def _log_softmax_local(x, dim, half_to_float, *, comm):
    if half_to_float:
        x = x.float()
    stat_shape = list(x.shape)
    stat_shape[dim] = 1
    if x.shape[dim] == 0:  # an empty class block (V < number of ranks): it holds no max
        local_max = x.new_full(stat_shape, float("-inf"))
    else:
        local_max = x.amax(dim, keepdim=True)
    row_max = comm.all_reduce(local_max, "max")
    # A row of all -inf gives nan here, exactly as on one device.
    sum_exp = comm.all_reduce((x - row_max).exp().sum(dim, keepdim=True), "sum")
    return x - row_max - sum_exp.log()


def _log_softmax_backward_rule(op: OpSchema, default) -> Sharding:
    """(grad_output, output, dim, input_dtype): grad_input = grad - exp(output) * sum(grad, dim)."""
    output = op.specs[1]
    dim = normalize_dim(op.arg("dim"), output.ndim)
    mesh_dims = _class_mesh_dims(output, dim)
    if not mesh_dims:
        return default(op)
    target = without_partial(output.placements)
    return Sharding(inputs=(target, target), outputs=(target,), local_op=_log_softmax_backward_local,
                    communication=(AllReduce(mesh_dims, ("sum",)),))


def _log_softmax_backward_local(grad, output, dim, input_dtype, *, comm):
    grad_sum = comm.all_reduce(grad.sum(dim, keepdim=True), "sum")
    return (grad - output.exp() * grad_sum).to(input_dtype)


# -- nll_loss -------------------------------------------------------------------------------------------


def _nll_class_dim(ndim: int) -> int:
    return 1 if ndim >= 2 else 0


def _nll_placements(self_spec: DTensorSpec, target_spec: DTensorSpec, mesh_dims: tuple[int, ...]):
    """Batch dims as the default rule lays them out; on class mesh dims self keeps Shard(C), target whole."""
    self_p, target_p = map(list, _batch_placements(self_spec, target_spec))
    for k in mesh_dims:
        self_p[k], target_p[k] = Shard(_nll_class_dim(self_spec.ndim)), Replicate()
    return tuple(self_p), tuple(target_p)


def _nll_forward_rule(op: OpSchema, default) -> Sharding:
    self_spec, target_spec = op.specs[0], op.specs[1]
    mesh_dims = _class_mesh_dims(self_spec, _nll_class_dim(self_spec.ndim))
    if not mesh_dims:
        return default(op)
    reduction = op.arg("reduction")
    self_p, target_p = _nll_placements(self_spec, target_spec, mesh_dims)
    whole = replicated(len(op.mesh_shape))
    block = self_spec.with_placements(self_p)
    inputs = nll_forward_layouts(op, self_p, target_p, whole)
    if reduction == NONE:  # per-row losses: summed over the class group; total_weight is 0
        out = tuple(Partial() if k in mesh_dims else p for k, p in enumerate(target_p))
        return Sharding(inputs=inputs, outputs=(out, whole), local_op=_nll_forward_local(op.func, block))
    partial = tuple(Partial() if p.is_shard() else Replicate() for p in self_p)
    if reduction == SUM:  # the total weight counts whole rows: summed over batch shards only
        total = tuple(Partial() if p.is_shard() and k not in mesh_dims else Replicate() for k, p in enumerate(self_p))
        return Sharding(inputs=inputs, outputs=(partial, total), local_op=_nll_forward_local(op.func, block))
    # mean: the global total weight is the local ones all-reduced over the batch shards (as ops/losses.py)
    batch_mesh_dims = tuple(k for k, p in enumerate(self_p) if p.is_shard() and k not in mesh_dims)
    return Sharding(inputs=inputs, outputs=(partial, whole), local_op=_nll_mean_local(op.func, block),
                    communication=(AllReduce(batch_mesh_dims, ("sum",)),))


def _total_weight(target, weight, ignore_index, dtype) -> torch.Tensor:
    keep = target != ignore_index
    if weight is None:
        return keep.sum().to(dtype)
    return (weight[torch.where(keep, target, 0)] * keep).sum().to(dtype)


def _to_block(target, weight, ignore_index, block: DTensorSpec):
    """Targets in this rank's class coordinates (others -> _LOCAL_IGNORE) and its slice of the weights."""
    sizes, offsets = block.local_shape_and_offset()
    class_dim = _nll_class_dim(block.ndim)
    start, length = offsets[class_dim], sizes[class_dim]
    shifted = target - start
    mine = (shifted >= 0) & (shifted < length) & (target != ignore_index)
    local_weight = None if weight is None else weight.narrow(0, start, length)
    return torch.where(mine, shifted, _LOCAL_IGNORE), local_weight


def _nll_forward_local(func, block: DTensorSpec):
    def local_op(self, target, weight, reduction, ignore_index):
        local_target, local_weight = _to_block(target, weight, ignore_index, block)
        out, _ = func(self, local_target, local_weight, reduction, _LOCAL_IGNORE)
        if reduction == NONE:
            return out, self.new_zeros(())
        return out, _total_weight(target, weight, ignore_index, self.dtype)

    return local_op


def _nll_mean_local(func, block: DTensorSpec):
    """The mean: the local sum over the class block / the global total weight (all-reduced over the declared
    batch mesh dims; none when the rows are whole, where the local total weight is already global)."""

    def local_op(self, target, weight, reduction, ignore_index, *, comm):
        total = comm.all_reduce(_total_weight(target, weight, ignore_index, self.dtype), "sum")
        local_target, local_weight = _to_block(target, weight, ignore_index, block)
        out, _ = func(self, local_target, local_weight, SUM, _LOCAL_IGNORE)
        return out / total, total  # total 0 gives nan, as on one device

    return local_op


def _nll_backward_rule(op: OpSchema, default) -> Sharding:
    self_spec, target_spec = op.specs[1], op.specs[2]
    mesh_dims = _class_mesh_dims(self_spec, _nll_class_dim(self_spec.ndim))
    if not mesh_dims:
        return default(op)
    reduction = op.arg("reduction")
    self_p, target_p = _nll_placements(self_spec, target_spec, mesh_dims)
    whole = replicated(len(op.mesh_shape))
    inputs = nll_backward_layouts(op, reduction, self_p, target_p, whole)
    block = self_spec.with_placements(self_p)
    return Sharding(inputs=inputs, outputs=(self_p,), local_op=_nll_backward_local(op.func, block))


def _nll_backward_local(func, block: DTensorSpec):
    def local_op(grad_output, self, target, weight, reduction, ignore_index, total_weight):
        local_target, local_weight = _to_block(target, weight, ignore_index, block)
        return func(grad_output, self, local_target, local_weight, reduction, _LOCAL_IGNORE, total_weight)

    return local_op


_RULES = {
    aten._log_softmax.default: _log_softmax_rule,
    aten._log_softmax_backward_data.default: _log_softmax_backward_rule,
    aten.nll_loss_forward.default: _nll_forward_rule,
    aten.nll_loss_backward.default: _nll_backward_rule,
}

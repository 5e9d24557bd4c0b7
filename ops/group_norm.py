"""Group norm: native_group_norm and native_group_norm_backward.

input (N, C, *spatial) is normalised over each (batch, group of C // group channels, all spatial) block; mean
and rstd are (N, group), weight and bias (C,). Per mesh dim:

    input                     out           mean/rstd    weight/bias   grad_input   grad_weight/grad_bias
    Shard(0)                  Shard(0)      Shard(0)     Replicate     Shard(0)     Partial(sum): rows split
    Shard(1), whole groups    Shard(1)      Shard(1)     Shard(0)      Shard(1)     Shard(0)
    grad Partial(sum|avg),    (backward only)            Replicate     Partial      Partial (same op): the
      input Replicate                                                               backward is linear in grad
    anything else             Replicate     Replicate    Replicate     Replicate    Replicate

"Whole groups": every rank's chunk of the C channels is exactly the channels of its chunk of the ``group``
groups (``block_shards.decide``: decided from the global sizes and placements, the same on every rank);
then the groups' rows of mean/rstd split as Shard(1) and the channels of weight/bias as Shard(0). Otherwise the
innermost channel shard is gathered until the rest cuts whole groups. In backward, a Shard of grad_output or
input leads and the other follows. The op's N, C and group arguments are global: the local op recounts them
from the local block (C // group channels per group), and a rank whose channel chunk is empty gets empty
outputs (torch refuses zero groups).
"""

from __future__ import annotations

from dtensor_plus.placements import Partial, Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import DTensorSpec

from . import block_shards
from .common import aten

R = Replicate()


def _decide(op: OpSchema, mesh_dim_rule, sources: tuple[DTensorSpec, ...], num_channels: int, num_groups: int):
    """``mesh_dim_rule(placements of sources, allow_channels)`` on every mesh dim, channel shards kept where
    they cut whole groups."""
    per_mesh_dim = [tuple(s.placements[k] for s in sources) for k in range(len(op.mesh_shape))]
    return block_shards.decide(op.mesh_shape, per_mesh_dim, mesh_dim_rule, 1, num_groups, num_channels // num_groups)


def _forward_mesh_dim(placements: tuple[Placement], allow_channels: bool) -> tuple[Placement, Placement, Placement]:
    """(input target = out placement, weight/bias target, mean/rstd placement) on one mesh dim."""
    (inp,) = placements
    if inp.is_shard(0):
        return inp, R, inp
    if inp.is_shard(1) and allow_channels:
        return inp, Shard(0), inp
    return R, R, R


@register_rule(aten.native_group_norm.default)
def group_norm_rule(op: OpSchema) -> Sharding:
    """native_group_norm(input, weight?, bias?, N, C, HxW, group, eps) -> (out, mean, rstd)."""
    decided = _decide(op, _forward_mesh_dim, (op.spec("input"),), op.arg("C"), op.arg("group"))
    inp, param, stats = (tuple(d[k] for d in decided) for k in range(3))
    inputs = {name: inp if name == "input" else param for name in op.names}  # weight, bias: param
    return Sharding(inputs=inputs, outputs=(inp, stats, stats), local_op=_group_norm_local)


def _group_norm_local(x, weight, bias, N, C, HxW, group, eps):
    n, c = x.shape[0], x.shape[1]
    if c == 0:  # an empty channel chunk: zero groups here
        return x.new_empty(x.shape), x.new_empty((n, 0)), x.new_empty((n, 0))
    # contiguous: a Shard(1) chunk is a strided view, and F.group_norm hands the kernel contiguous input
    return aten.native_group_norm.default(x.contiguous(), weight, bias, n, c, HxW, c // (C // group), eps)


def _backward_mesh_dim(placements: tuple[Placement, Placement], allow_channels: bool) -> tuple:
    """(grad/input/mean/rstd target, grad target, weight target, grad_input, grad_weight/bias placement)."""
    grad, inp = placements
    lead = next((p for p in (grad, inp) if p.is_shard(0) or (p.is_shard(1) and allow_channels)), None)
    if lead is not None and lead.is_shard(0):
        return lead, lead, R, lead, Partial("sum")
    if lead is not None:
        return lead, lead, Shard(0), lead, Shard(0)
    if grad.is_partial() and grad.reduce_op in ("sum", "avg") and inp.is_replicate():
        return R, grad, R, grad, grad
    return R, R, R, R, R


@register_rule(aten.native_group_norm_backward.default)
def group_norm_backward_rule(op: OpSchema) -> Sharding:
    """native_group_norm_backward(grad_out, input, mean, rstd, weight?, N, C, HxW, group, output_mask)
    -> (grad_input, grad_weight, grad_bias); outputs not asked for by output_mask are undefined."""
    decided = _decide(op, _backward_mesh_dim, (op.spec("grad_out"), op.spec("input")), op.arg("C"), op.arg("group"))
    base, grad, weight, grad_input, grad_param = (tuple(d[k] for d in decided) for k in range(5))
    inputs = {"grad_out": grad, "input": base, "mean": base, "rstd": base}
    if op.spec("weight") is not None:
        inputs["weight"] = weight
    outputs = (grad_input, grad_param, grad_param)
    mask = op.arg("output_mask")
    return Sharding(inputs=inputs, outputs=tuple(o for o, m in zip(outputs, mask) if m), local_op=_backward_local)


def _backward_local(grad, x, mean, rstd, weight, N, C, HxW, group, output_mask):
    n, c = x.shape[0], x.shape[1]
    if c == 0:  # an empty channel chunk: zero groups here, nothing to compute
        empties = (x.new_empty(x.shape), x.new_empty((0,)), x.new_empty((0,)))
        return tuple(e if m else None for e, m in zip(empties, output_mask))
    # The CPU kernel reads its tensors as contiguous buffers (F.group_norm makes the input so); a Shard(1)
    # chunk of grad, input, mean or rstd is a strided view.
    grad, x, mean, rstd = (t.contiguous() for t in (grad, x, mean, rstd))
    local_groups = c // (C // group)
    return aten.native_group_norm_backward.default(grad, x, mean, rstd, weight, n, c, HxW, local_groups, output_mask)

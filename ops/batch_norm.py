"""Batch norm: ``native_batch_norm`` (and ``_native_batch_norm_legit``, with or without running statistics)
and ``native_batch_norm_backward``. Input (N, C, *spatial); weight, bias, running_mean, running_var,
save_mean, save_invstd (C,).

Every statistic is per channel, so a channel Shard is always local. In training the statistics sum over
batch and spatial dims, so those are gathered (a synchronised batch norm would all-reduce them; not done);
in eval the running statistics make the op pointwise there. Per mesh dim:

    layout                          forward: input / (C,) tensors / out   backward: grad_input, grad_w, grad_b
    input or grad Shard(1)          Shard(1) / Shard(0) / Shard(1)        Shard(1), Shard(0), Shard(0)
    eval, input Shard(d), d != 1    Shard(d) / Replicate / Shard(d)       Shard(d), Partial(sum), Partial(sum)
    backward, grad Partial(sum |                                          Partial(same) each: linear in grad
      avg), the rest Replicate
    anything else                   Replicate

Training updates running_mean / running_var in place, so there they keep their placements: Shard(0) stats
put the input on the channel layout, Replicate stats the input on Replicate (every rank updates its replica
alike). torch's kernels refuse (forward, training) or crash on (backward) an empty input, so an empty local
block of a non-empty tensor gets its result without them: empty outputs, zero gradients.
"""

from __future__ import annotations

import torch

from dtensor_plus.placements import Partial, Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule

_R = Replicate()
aten = torch.ops.aten


def _forward_mesh_dim(op: OpSchema, k: int, training: bool):
    """(input target, (C,) tensors' target, out placement, save_mean/invstd placement) on mesh dim k."""
    p = op.spec("input").placements[k]
    if training:
        stats = [s.placements[k] for s in (op.spec("running_mean"), op.spec("running_var")) if s is not None]
        # Updated in place, the stats must keep their placement: Shard(0) stats take the channel layout.
        channel = all(q.is_shard(0) for q in stats) if stats else p.is_shard(1)
        return (Shard(1), Shard(0), Shard(1), Shard(0)) if channel else (_R, _R, _R, _R)
    if p.is_shard(1):
        return Shard(1), Shard(0), Shard(1), _R
    if isinstance(p, Shard):
        return p, _R, p, _R
    return _R, _R, _R, _R


@register_rule(aten.native_batch_norm.default, aten._native_batch_norm_legit.default,
               aten._native_batch_norm_legit.no_stats, aten._batch_norm_with_update.default)
def batch_norm_rule(op: OpSchema) -> Sharding:
    """native_batch_norm / _native_batch_norm_legit(input, weight?, bias?, running_mean?, running_var?,
    training, momentum, eps) -> (out, save_mean, save_invstd), in eval save_* of shape (0,); the no_stats
    form has no running statistics. _batch_norm_with_update (always training: no ``training`` argument) adds a
    reserve output."""
    training = "training" not in op.record.arg_names or bool(op.arg("training"))
    targets: dict[str, list[Placement]] = {name: [] for name in op.names}  # input; weight, bias, stats (C,)
    out, save = [], []
    for k in range(len(op.mesh_shape)):
        x, channel, o, s = _forward_mesh_dim(op, k, training)
        for name, placements in targets.items():
            placements.append(x if name == "input" else channel)
        out.append(o)
        save.append(s)
    local_op = _skip_empty_forward(op.func) if training and op.spec("input").shape.numel() > 0 else None
    outputs = (tuple(out), tuple(save), tuple(save))
    if op.func == aten._batch_norm_with_update.default:
        outputs += ((_R,) * len(op.mesh_shape),)  # the reserve: empty on CPU
    return Sharding(inputs={name: tuple(t) for name, t in targets.items()}, outputs=outputs, local_op=local_op)


def _skip_empty_forward(func):
    def local_op(x, *args):
        if x.numel() > 0:
            return func(x, *args)
        channels = x.shape[1]  # this rank's channel block is empty (training only runs on whole batches)
        outs = (torch.empty_like(x), x.new_zeros(channels), x.new_zeros(channels))
        return outs + (x.new_empty(0, dtype=torch.uint8),) if func == aten._batch_norm_with_update.default else outs

    return local_op


def _backward_mesh_dim(g: Placement, p: Placement, train: bool):
    """(grad and input target, (C,) tensors' target, grad_input, grad_weight/bias placement) on one mesh dim."""
    if p.is_shard(1) or g.is_shard(1):
        return Shard(1), Shard(0), Shard(1), Shard(0)
    if not train:
        for q in (p, g):
            if isinstance(q, Shard):
                return q, _R, q, Partial()
    if g.is_partial() and g.reduce_op in ("sum", "avg") and p.is_replicate():
        return None, _R, g, g  # None: grad keeps its Partial, input stays Replicate
    return _R, _R, _R, _R


@register_rule(aten.native_batch_norm_backward.default, aten.batch_norm_backward.default)
def batch_norm_backward_rule(op: OpSchema) -> Sharding:
    """native_batch_norm_backward(grad_out, input, weight?, running_mean?, running_var?, save_mean?,
    save_invstd?, train, eps, output_mask) -> (grad_input, grad_weight, grad_bias), masked-off ones None;
    batch_norm_backward has ``update`` for ``train`` and a reserve (empty on CPU, Replicate) after the mask."""
    train = bool(op.arg("train" if "train" in op.record.arg_names else "update"))  # batch_norm_backward: update
    mask = op.arg("output_mask")
    grad, x = op.spec("grad_out"), op.spec("input")
    # weight, running_mean/var, save_mean and save_invstd (save_var) are (C,); the reserve is an opaque buffer.
    targets: dict[str, list[Placement]] = {name: [] for name in op.names}
    gi, gp = [], []
    for k in range(len(op.mesh_shape)):
        data, channel, i, w = _backward_mesh_dim(grad.placements[k], x.placements[k], train)
        grad_target, x_target = (grad.placements[k], _R) if data is None else (data, data)
        for name, placements in targets.items():
            placements.append({"grad_out": grad_target, "input": x_target, "reserve": _R}.get(name, channel))
        gi.append(i)
        gp.append(w)
    outputs = tuple(o for o, m in zip((tuple(gi), tuple(gp), tuple(gp)), mask) if m)
    local_op = _skip_empty_backward(op.func) if x.shape.numel() > 0 else None
    return Sharding(inputs={name: tuple(t) for name, t in targets.items()}, outputs=outputs, local_op=local_op)


def _skip_empty_backward(func):
    def local_op(grad, x, *args):
        if x.numel() > 0:
            return func(grad, x, *args)
        mask = args[7]  # an empty block: no contribution to any gradient
        channels = x.shape[1]
        return (torch.zeros_like(x) if mask[0] else None, x.new_zeros(channels) if mask[1] else None,
                x.new_zeros(channels) if mask[2] else None)

    return local_op

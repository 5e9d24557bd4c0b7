"""Layer norm over a sharded hidden dim (Optimus' LayerNorm2D): the statistics of each row all-reduced, never
the row gathered. Installed by ``layouts.tensor_parallel_2d()`` / ``tensor_parallel_3d()`` (never globally);
the default rule (ops/normalization.py) makes the normalised dim whole, an all-gather of the activation.

Applies when one dim is normalised (``normalized_shape`` of length 1), the input's last dim is Shard(-1) on
mesh dims K and the weight and bias (D,) are Shard(0) on exactly K and Replicate elsewhere; other mesh dims
keep ops/normalization.py's treatment (leading dims sharded: rows independent). Per mesh dim k in K:

    op                            placements                                  communication on K
    native_layer_norm             out Shard(-1), mean/rstd Replicate          all_reduce sum, sum of (rows, 1):
                                                                              the mean, then the squared deviations
    native_layer_norm_backward    grad_input Shard(-1), grad_weight/bias      all_reduce sum of (rows, 2):
                                  Shard(0)                                    sum(g w) and sum(g w xhat)

with ``grad_input = rstd (g w - mean(g w) - xhat mean(g w xhat))``, the means over the whole hidden dim. Two
passes in forward (mean, then the variance about it) so the variance is as exact as one device's.
"""

from __future__ import annotations

import functools

import torch

from dtensor_plus.declared import AllReduce
from dtensor_plus.placements import Partial, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding

from .common import aten
from .normalization import layer_norm_backward_rule, layer_norm_rule

__all__ = ["sharded_norm_rules"]


def sharded_norm_rules() -> dict:
    """{aten op: rule} for ``rules.override_rule``."""
    return {aten.native_layer_norm.default: _forward_rule,
            aten.native_layer_norm_backward.default: _backward_rule}


def _hidden_mesh_dims(op: OpSchema) -> tuple[int, ...] | None:
    """The mesh dims sharding the normalised (last) dim, when this rule applies; else None."""
    x = op.spec("input")
    if x is None or len(op.arg("normalized_shape")) != 1 or x.ndim < 2:
        return None
    last = x.ndim - 1
    hidden = tuple(k for k, p in enumerate(x.placements) if isinstance(p, Shard) and p.normalized(x.ndim).dim == last)
    if not hidden or any(not (isinstance(p, (Shard, Replicate))) for p in x.placements):
        return None
    for name in ("weight", "bias"):
        param = op.spec(name)
        want = tuple(Shard(0) if k in hidden else Replicate() for k in range(len(x.placements)))
        if param is not None and tuple(param.placements) != want:
            return None
    return hidden


def _stats_placements(x_placements, hidden) -> tuple:
    return tuple(Replicate() if k in hidden else p for k, p in enumerate(x_placements))


def _forward_rule(op: OpSchema) -> Sharding:
    """native_layer_norm(input, normalized_shape, weight?, bias?, eps) -> (out, mean, rstd)."""
    hidden = _hidden_mesh_dims(op)
    if hidden is None:
        return layer_norm_rule(op)
    x = op.spec("input").placements
    stats = _stats_placements(x, hidden)
    width = op.spec("input").shape[-1]
    return Sharding(inputs={"input": x}, outputs=(x, stats, stats),
                    local_op=functools.partial(_forward_local, width=width),
                    communication=(AllReduce(hidden, ("sum", "sum")),))


def _forward_local(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, width, comm):
    mean = comm.all_reduce(x.sum(-1, keepdim=True), "sum") / width
    centred = x - mean
    var = comm.all_reduce((centred * centred).sum(-1, keepdim=True), "sum") / width
    rstd = torch.rsqrt(var + eps)
    out = centred * rstd
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out, mean, rstd


def _backward_rule(op: OpSchema) -> Sharding:
    """(grad_out, input, normalized_shape, mean, rstd, weight?, bias?, output_mask) -> grads."""
    hidden = _hidden_mesh_dims(op)
    grad = op.spec("grad_out")
    if hidden is None or grad is None or tuple(grad.placements) != tuple(op.spec("input").placements):
        return layer_norm_backward_rule(op)
    x = op.spec("input").placements
    stats = _stats_placements(x, hidden)
    param = tuple(Shard(0) if k in hidden else Partial() if isinstance(p, Shard) else Replicate()
                  for k, p in enumerate(x))
    outputs = [x, param, param]
    width = op.spec("input").shape[-1]
    mask = op.arg("output_mask")
    return Sharding(inputs={"grad_out": x, "input": x, "mean": stats, "rstd": stats},
                    outputs=tuple(o for o, m in zip(outputs, mask) if m),
                    local_op=functools.partial(_backward_local, width=width),
                    communication=(AllReduce(hidden, ("sum",)),))


def _backward_local(grad_out, x, normalized_shape, mean, rstd, weight, bias, output_mask, *, width, comm):
    xhat = (x - mean) * rstd
    g = grad_out * weight if weight is not None else grad_out
    sums = comm.all_reduce(torch.cat([g.sum(-1, keepdim=True), (g * xhat).sum(-1, keepdim=True)], -1), "sum")
    mean_g, mean_gx = (sums / width).split(1, -1)
    leading = tuple(range(x.ndim - 1))
    grads = [rstd * (g - mean_g - xhat * mean_gx) if output_mask[0] else None,
             (grad_out * xhat).sum(leading) if output_mask[1] and weight is not None else None,
             grad_out.sum(leading) if output_mask[2] and bias is not None else None]
    return tuple(grads)  # None where not asked for, as aten returns them

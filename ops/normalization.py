"""Layer norm and RMS norm, forward and backward.

The statistics are taken over the trailing ``normalized_shape`` dims, so those must be whole; the leading
dims are independent rows and may stay sharded. ``axis`` is the first normalised dim. Per mesh dim:

    input                    out, mean/rstd     weight/bias   grad_input   grad_weight/grad_bias
    Shard(d), d < axis       Shard(d)           Replicate     Shard(d)     Partial(sum): rows split
    Shard(d), d >= axis      Replicate          Replicate     Replicate    Replicate
    Replicate                Replicate          Replicate     Replicate    Replicate
    Partial                  Replicate          Replicate     Replicate    Replicate
    grad Partial(sum|avg),   (backward only)                  Partial      Partial (same reduce op): the
      input Replicate                                                      backward is linear in grad

mean/rstd have the input's rank (size 1 in the normalised dims), so a leading Shard(d) is Shard(d) there
too. The backward takes a leading-dim Shard of the grad when the input is replicated (slicing the input,
mean and rstd is free).

On CUDA ``F.rms_norm`` dispatches to ``_fused_rms_norm`` / ``_fused_rms_norm_backward`` (rules below). On
CPU both are CompositeImplicitAutograd in torch 2.13 and decompose before reaching the DTensor (pow,
mean.dim, add, rsqrt, mul, and in backward sum.dim_IntList): the pointwise and reduction rules cover it.

Kernels: the local ops of native_layer_norm, _fused_rms_norm and their backwards run the fused Triton kernels
(kernels/norms.py, same signatures) where ``dtensor_plus.kernels.use_kernels`` allows and the layout fits (one
normalised dim, a weight); the aten op otherwise. The choice is made per call, so cached rules stay valid.
"""

from __future__ import annotations

import dataclasses

from dtensor_plus.kernels import norms, switch
from dtensor_plus.placements import Partial, Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, replicated


def _leading(placement: Placement, axis: int) -> Placement:
    """Keep a Shard of a leading (row) dim; anything else must be whole and reduced."""
    return placement if isinstance(placement, Shard) and placement.dim < axis else Replicate()


def _axis(op: OpSchema) -> int:
    return op.spec("input").ndim - len(op.arg("normalized_shape"))


def _kernel(name: str, x, normalized_shape, weight) -> bool:
    return norms.kernel_fits(x, normalized_shape, weight) and switch.want_kernel(name, x)


def _layer_norm_local(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    if _kernel("layer_norm", x, normalized_shape, weight):
        return norms.layer_norm_aten(x, normalized_shape, weight, bias, eps)
    return aten.native_layer_norm.default(x, normalized_shape, weight, bias, eps)


def _rms_norm_local(x, normalized_shape, weight=None, eps=None):
    if _kernel("rms_norm", x, normalized_shape, weight):
        return norms.rms_norm_aten(x, normalized_shape, weight, eps)
    return aten._fused_rms_norm.default(x, normalized_shape, weight, eps)


def _forward(op: OpSchema, num_outputs: int, local_op=None) -> Sharding:
    """(input, normalized_shape, weight?, ...): rows keep their Shard, params (weight, bias) are replicated."""
    axis = _axis(op)
    target = tuple(_leading(p, axis) for p in op.spec("input").placements)
    r = replicated(len(op.mesh_shape))
    inputs = {name: target if name == "input" else r for name in op.names}
    return Sharding(inputs=inputs, outputs=(target,) * num_outputs, local_op=local_op)


@register_rule(aten.native_layer_norm.default, strided="as_shard")  # rows are normalised independently
def layer_norm_rule(op: OpSchema) -> Sharding:
    """native_layer_norm(input, normalized_shape, weight?, bias?, eps) -> (out, mean, rstd)."""
    return _forward(op, 3, _layer_norm_local)


@register_rule(aten._fused_rms_norm.default, strided="as_shard")  # rows are normalised independently
def rms_norm_rule(op: OpSchema) -> Sharding:
    """_fused_rms_norm(input, normalized_shape, weight?, eps) -> (out, rstd)."""
    return _forward(op, 2, _rms_norm_local)


def _backward_mesh_dim(grad: Placement, inp: Placement, axis: int) -> tuple[Placement, Placement, Placement]:
    """(grad target, target of input/mean/rstd, grad_input placement; params' grads follow) on one mesh dim."""
    base = _leading(inp, axis)
    if base.is_replicate():
        if isinstance(grad, Shard) and grad.dim < axis:
            base = grad
        elif grad.is_partial() and grad.reduce_op in ("sum", "avg"):
            return grad, base, Partial(grad.reduce_op)
    return base, base, base


def _param_grad(placement: Placement) -> Placement:
    """A param's grad sums over rows: rows split across a mesh dim leave per-rank partial sums."""
    return Partial("sum") if isinstance(placement, Shard) else placement


_PARAMS = ("weight", "bias")


def _backward(op: OpSchema) -> Sharding:
    """(grad_out, input, normalized_shape, stats..., params..., output_mask): the stats (mean, rstd) follow the
    input's rows, the params are replicated."""
    grad, inp = op.spec("grad_out"), op.spec("input")
    axis = _axis(op)
    per_mesh_dim = [_backward_mesh_dim(g, i, axis) for g, i in zip(grad.placements, inp.placements)]
    grad_target, base, grad_input = (tuple(p[k] for p in per_mesh_dim) for k in range(3))
    r = replicated(len(op.mesh_shape))
    inputs = {name: r if name in _PARAMS else base for name in op.names}
    inputs["grad_out"] = grad_target
    param = tuple(_param_grad(p) for p in grad_input)
    # Outputs not asked for by output_mask come back undefined (None): they have no spec.
    mask = op.arg("output_mask")
    outputs = [grad_input] + [param] * (len(mask) - 1)
    return Sharding(inputs=inputs, outputs=tuple(o for o, m in zip(outputs, mask) if m))


@register_rule(aten.native_layer_norm_backward.default, strided="as_shard")  # rows are normalised independently
def layer_norm_backward_rule(op: OpSchema) -> Sharding:
    """(grad_out, input, normalized_shape, mean, rstd, weight?, bias?, output_mask) -> (gi, gw, gb)."""
    return dataclasses.replace(_backward(op), local_op=_layer_norm_backward_contiguous)


def _layer_norm_backward_contiguous(grad, x, normalized_shape, mean, rstd, weight, bias, output_mask):
    if _kernel("layer_norm", x, normalized_shape, weight):
        return norms.layer_norm_backward_aten(grad, x, normalized_shape, mean, rstd, weight, bias, output_mask)
    # The CPU kernel reads mean and rstd as if contiguous: a Shard's chunk of them is a strided view.
    return aten.native_layer_norm_backward.default(grad, x, normalized_shape, mean.contiguous(), rstd.contiguous(),
                                                   weight, bias, output_mask)


@register_rule(aten._fused_rms_norm_backward.default, strided="as_shard")  # rows are normalised independently
def rms_norm_backward_rule(op: OpSchema) -> Sharding:
    """(grad_out, input, normalized_shape, rstd, weight?, output_mask) -> (grad_input, grad_weight)."""
    return dataclasses.replace(_backward(op), local_op=_rms_norm_backward_local)


def _rms_norm_backward_local(grad, x, normalized_shape, rstd, weight, output_mask):
    if _kernel("rms_norm", x, normalized_shape, weight):
        return norms.rms_norm_backward_aten(grad, x, normalized_shape, rstd, weight, output_mask)
    return aten._fused_rms_norm_backward.default(grad, x, normalized_shape, rstd, weight, output_mask)

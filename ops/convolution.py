"""Convolution (``aten.convolution``: conv1d/2d/3d and the transposed forms) and ``convolution_backward``.

Input (N, C_in, *spatial); weight (C_out, C_in / groups, *kernel), transposed (C_in, C_out / groups, *kernel);
bias (C_out,); output (N, C_out, *spatial'). Per mesh dim, the first strategy that the current layouts ask
for (channel strategies only with groups == 1):

    strategy      input      weight          bias            output / grad_input, grad_weight, grad_bias
    batch         Shard(0)   Replicate       Replicate       Shard(0) / Shard(0), Partial(sum), Partial(sum)
    out channels  Replicate  Shard(out dim)  Shard(0)        Shard(1) / Partial(sum), Shard(out dim), Shard(0)
    in channels   Shard(1)   Shard(in dim)   Partial(sum)    Partial(sum) / Shard(1), Shard(in dim), Replicate
    Partial(r)    one of input, weight (or grad_output) Partial(r), r in sum | avg, the rest Replicate: the
                  convolution is linear in each; outputs Partial(r) (a Replicate bias partitioned for free)
    replicate     everything else, spatial dims included: gathered

In the backward the grad_output follows the output column: Shard(0) for batch, Shard(1) for out channels,
Replicate for in channels. The layouts are asked for by: input Shard(0) or grad_output Shard(0) (batch);
weight Shard(out dim) or grad_output Shard(1) (out channels); input Shard(1) or weight Shard(in dim) (in
channels). Spatial shards are gathered (a halo exchange would avoid it; not done).

torch's kernels refuse a weight with no output channels and give a wrong shape for no input channels, so a
channel block that is empty on this rank (and only there) gets its result without calling them: zeros plus
the bias, or zero gradients (grad_bias is still the sum of grad_output).
"""

from __future__ import annotations

from dtensor_plus.placements import Partial, Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten, meta_outputs

_LINEAR = ("sum", "avg")
_R = Replicate()


def _weight_dims(transposed: bool) -> tuple[int, int]:
    """(out-channel dim, in-channel dim) of the weight."""
    return (1, 0) if transposed else (0, 1)


def _partial_of(placements: list[Placement]) -> Partial | None:
    """Exactly one of ``placements`` is Partial(sum | avg), the others Replicate: that Partial."""
    partials = [p for p in placements if p.is_partial()]
    num_replicate = sum(p.is_replicate() for p in placements)
    if len(partials) == 1 and partials[0].reduce_op in _LINEAR and num_replicate == len(placements) - 1:
        return partials[0]
    return None


# -- forward --------------------------------------------------------------------------------------------


def _forward_mesh_dim(x: Placement, w: Placement, groups: int, out_dim: int, in_dim: int):
    """(input, weight, bias, output) placements on one mesh dim."""
    if x.is_shard(0):
        return Shard(0), _R, _R, Shard(0)
    if groups == 1 and w.is_shard(out_dim):
        return _R, Shard(out_dim), Shard(0), Shard(1)
    if groups == 1 and (x.is_shard(1) or w.is_shard(in_dim)):
        return Shard(1), Shard(in_dim), Partial(), Partial()
    partial = _partial_of([x, w])
    if partial is not None:
        return x, w, partial, partial
    return _R, _R, _R, _R


@register_rule(aten.convolution.default)
def convolution_rule(op: OpSchema) -> Sharding:
    """convolution(input, weight, bias?, stride, padding, dilation, transposed, output_padding, groups)."""
    x, w, bias = op.spec("input"), op.spec("weight"), op.spec("bias")
    transposed, groups = op.arg("transposed"), op.arg("groups")
    out_dim, in_dim = _weight_dims(transposed)
    rows = [_forward_mesh_dim(x.placements[k], w.placements[k], groups, out_dim, in_dim)
            for k in range(len(op.mesh_shape))]
    x_t, w_t, bias_t, out = (tuple(column) for column in zip(*rows))
    inputs = {"input": x_t, "weight": w_t}
    if bias is not None:
        inputs["bias"] = bias_t
    return Sharding(inputs=inputs, outputs=(out,), local_op=_EmptyChannels(x.shape[1], meta_outputs(op)[0].shape))


class _EmptyChannels:
    """convolution on the local blocks; where this rank's block of a non-empty channel dim is empty: zeros
    (+ bias). Channels empty on one device too are left to the kernel, which behaves as it does there."""

    def __init__(self, c_in: int, global_out_shape):
        self.c_in, self.c_out, self.spatial = c_in, global_out_shape[1], tuple(global_out_shape[2:])

    def __call__(self, x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
        c_out = w.shape[1] * groups if transposed else w.shape[0]
        if (x.shape[1] > 0 or self.c_in == 0) and (c_out > 0 or self.c_out == 0):
            return aten.convolution.default(x, w, bias, stride, padding, dilation, transposed, output_padding, groups)
        out = x.new_zeros((x.shape[0], c_out) + self.spatial)
        if bias is not None:
            out = out + bias.reshape((1, c_out) + (1,) * len(self.spatial))
        return out


# -- backward -------------------------------------------------------------------------------------------


def _backward_mesh_dim(g: Placement, x: Placement, w: Placement, groups: int, out_dim: int, in_dim: int):
    """(grad_output, input, weight, grad_input, grad_weight, grad_bias) placements on one mesh dim."""
    if x.is_shard(0) or g.is_shard(0):
        return Shard(0), Shard(0), _R, Shard(0), Partial(), Partial()
    if groups == 1 and (w.is_shard(out_dim) or g.is_shard(1)):
        return Shard(1), _R, Shard(out_dim), Partial(), Shard(out_dim), Shard(0)
    if groups == 1 and (x.is_shard(1) or w.is_shard(in_dim)):
        return _R, Shard(1), Shard(in_dim), Shard(1), Shard(in_dim), _R
    if g.is_partial() and g.reduce_op in _LINEAR and x.is_replicate() and w.is_replicate():
        return g, _R, _R, g, g, g  # every gradient is linear in grad_output
    return _R, _R, _R, _R, _R, _R


@register_rule(aten.convolution_backward.default)
def convolution_backward_rule(op: OpSchema) -> Sharding:
    """convolution_backward(grad_output, input, weight, bias_sizes?, stride, padding, dilation, transposed,
    output_padding, groups, output_mask) -> (grad_input, grad_weight, grad_bias), the masked-off ones None."""
    g, x, w = op.spec("grad_output"), op.spec("input"), op.spec("weight")
    transposed, groups, mask = op.arg("transposed"), op.arg("groups"), op.arg("output_mask")
    out_dim, in_dim = _weight_dims(transposed)
    rows = [_backward_mesh_dim(g.placements[k], x.placements[k], w.placements[k], groups, out_dim, in_dim)
            for k in range(len(op.mesh_shape))]
    g_t, x_t, w_t, gi, gw, gb = (tuple(column) for column in zip(*rows))
    outputs = tuple(o for o, m in zip((gi, gw, gb), mask) if m)
    return Sharding(inputs={"grad_output": g_t, "input": x_t, "weight": w_t}, outputs=outputs,
                    local_op=_Backward(x.shape[1], g.shape[1]))


class _Backward:
    """convolution_backward on the local blocks. bias_sizes is the global C_out: this rank's grad_bias has its
    own block's size. An empty block of a non-empty channel dim gets zero gradients without the kernel."""

    def __init__(self, c_in: int, c_out: int):
        self.c_in, self.c_out = c_in, c_out

    def __call__(self, grad, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask):
        c_out = grad.shape[1]
        if bias_sizes is not None:
            bias_sizes = [c_out]
        if (x.shape[1] > 0 or self.c_in == 0) and (c_out > 0 or self.c_out == 0):
            return aten.convolution_backward.default(grad, x, w, bias_sizes, stride, padding, dilation, transposed,
                                                     output_padding, groups, mask)
        grad_bias = grad.sum([d for d in range(grad.ndim) if d != 1]) if mask[2] else None
        return (x.new_zeros(x.shape) if mask[0] else None, w.new_zeros(w.shape) if mask[1] else None, grad_bias)

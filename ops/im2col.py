"""im2col (F.unfold) and col2im (F.fold), and channel_shuffle: ops that regroup the channel dim in blocks.

im2col takes input (N?, C, H, W) to columns (N?, C * kh * kw, L): row c * kh * kw + j of the columns holds
channel c's pixels under kernel offset j at the L window positions; col2im is its adjoint (it sums the
overlapping windows back into (N?, C, H, W), ``output_size`` spatial). The batch dim is optional. Per mesh dim:

    im2col input / col2im output   columns                  why
    Shard(batch)                   Shard(batch)             samples are independent
    Shard(C), whole blocks         Shard(C * kh * kw)       channel c owns rows [c * K, (c + 1) * K), K = kh * kw
    Partial (im2col: any op;       Partial (same op)        im2col copies entries or pads zeros (which every
      col2im: sum | avg)                                    reduction keeps); col2im adds them (linear)
    Replicate                      Replicate                a spatial dim, or L (a window spans shards)

"Whole blocks" (``block_shards``): each rank's chunk of the C * K rows is K times its chunk of the C channels;
torch.chunk sizes don't always agree (C=3, K=4 on 2 ranks: rows 6 + 6, channels 2 + 1), and then the innermost
such shard is gathered. A rank whose channel chunk is empty gets empty outputs (torch's kernels refuse them).

channel_shuffle(x (N, C, *), groups) permutes channels (C read as (groups, C // groups), transposed): the batch
and spatial dims keep their Shard, a channel Shard is gathered, and any Partial passes (a permutation).
"""

from __future__ import annotations

from dtensor_plus.placements import Placement, Replicate
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from . import block_shards
from .common import aten, meta_outputs

R = Replicate()


def _mesh_dim_rule(batched: bool, channel_dim: int, keeps: tuple[str, ...]):
    """The per-mesh-dim decision: (placement of the channel-side tensor, of the columns), or the input's
    target and output placement, which are the same tensor dims renamed (batch 0, channels ``channel_dim``)."""

    def rule(placements: tuple[Placement], allow_channels: bool) -> tuple[Placement, Placement]:
        (p,) = placements
        if batched and p.is_shard(0):
            return p, p
        if p.is_shard(channel_dim) and allow_channels:
            return p, p
        if p.is_partial() and p.reduce_op in keeps:
            return p, p
        return R, R

    return rule


def _block_rule(op: OpSchema, channel_dim: int, num_channels: int, kernel_size, keeps: tuple[str, ...]) -> Sharding:
    spec = op.specs[0]
    block = kernel_size[0] * kernel_size[1]
    rule = _mesh_dim_rule(channel_dim == 1, channel_dim, keeps)
    per_mesh_dim = [(p,) for p in spec.placements]
    decided = block_shards.decide(op.mesh_shape, per_mesh_dim, rule, channel_dim, num_channels, block)
    target, out = (tuple(d[k] for d in decided) for k in range(2))
    meta = meta_outputs(op)[0]
    return Sharding(inputs=(target,), outputs=(out,), local_op=_skip_empty_channels(op.func, channel_dim, meta.shape))


def _skip_empty_channels(func, channel_dim: int, global_out_shape):
    """``func``, or empty outputs (local batch, no channels, whole trailing dims) where the chunk has none."""
    trailing = tuple(global_out_shape[channel_dim + 1:])

    def local_op(x, *args):
        if x.shape[channel_dim] > 0:
            return func(x, *args)
        return x.new_empty(tuple(x.shape[:channel_dim]) + (0,) + trailing)

    return local_op


@register_rule(aten.im2col.default)
def im2col_rule(op: OpSchema) -> Sharding:
    """im2col(input, kernel_size, dilation, padding, stride) -> columns."""
    spec = op.specs[0]
    channel_dim = spec.ndim - 3
    return _block_rule(op, channel_dim, spec.shape[channel_dim], op.arg("kernel_size"), ("sum", "avg", "max", "min"))


@register_rule(aten.col2im.default)
def col2im_rule(op: OpSchema) -> Sharding:
    """col2im(columns, output_size, kernel_size, dilation, padding, stride) -> output."""
    spec = op.specs[0]
    channel_dim = spec.ndim - 2
    kernel_size = op.arg("kernel_size")
    num_channels = spec.shape[channel_dim] // (kernel_size[0] * kernel_size[1])
    return _block_rule(op, channel_dim, num_channels, kernel_size, ("sum", "avg"))


@register_rule(aten.channel_shuffle.default, aten.native_channel_shuffle.default)
def channel_shuffle_rule(op: OpSchema) -> Sharding:
    """channel_shuffle(input, groups) -> output of the same shape."""
    keep = tuple(R if p.is_shard(1) else p for p in op.specs[0].placements)
    return Sharding(inputs=(keep,), outputs=(keep,))

"""grid_sampler_2d / grid_sampler_3d, forward and backward.

input (N, C, *spatial) is sampled at the points of grid (N, *out_spatial, k), k = 2 or 3 coordinates, giving
out (N, C, *out_spatial). Every sample reads a whole plane of one (batch, channel) of the input at a point of
its own batch's grid, so batch splits both alike, channels split the input alone and the grid's points split
the grid alone; the input's spatial dims and the coordinate dim must be whole. Sampling is linear in the input
(weights from the grid). Per mesh dim, first match wins:

    input          grid            out          why
    Shard(0)       Shard(0)        Shard(0)     either sharded on batch: both sliced alike
    Shard(1)       Replicate       Shard(1)     channels are sampled independently
    Replicate      Shard(1 + i)    Shard(2 + i) a point of the grid (i < num spatial) samples on its own
    Partial(s|a)   Replicate       Partial      linear in the input (s|a: sum, avg)
    Replicate      Replicate       Replicate    anything else (a spatial dim of the input, the coordinates)

Backward (grad_output shaped like out; grad_input like input, grad_grid like grid), first match wins:

    grad_output    input          grid           grad_input    grad_grid     why
    Shard(0)       Shard(0)       Shard(0)       Shard(0)      Shard(0)      one of the three batch-sharded
    Shard(1)       Shard(1)       Replicate      Shard(1)      Partial(sum)  grad_grid sums over channels
    Shard(2 + i)   Replicate      Shard(1 + i)   Partial(sum)  Shard(1 + i)  grid points scatter into the input
    Partial(s|a)   Replicate      Replicate      Partial       Partial       linear in grad_output
    Replicate      Partial(s|a)   Replicate      Replicate     Partial       grad_input does not read the input's
                                                                             values, grad_grid is linear in them
    Replicate      Replicate      Replicate      Replicate     Replicate

With output_mask[0] False, grad_input is undefined (no output); grad_grid is always returned.
Empty local blocks (a short batch, channel or point chunk) are fine for torch's kernels: no special case.
"""

from __future__ import annotations

from dtensor_plus.placements import Partial, Placement, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule

from .common import aten

_LINEAR = ("sum", "avg")
R = Replicate()
_SUM = Partial("sum")


def _linear_partial(p: Placement) -> bool:
    return p.is_partial() and p.reduce_op in _LINEAR


def _point_shard(grid: Placement, num_spatial: int) -> int | None:
    """i when the grid is sharded on its i-th point dim (1 + i), else None."""
    if isinstance(grid, Shard) and 1 <= grid.dim <= num_spatial:
        return grid.dim - 1
    return None


def _forward_mesh_dim(inp: Placement, grid: Placement, num_spatial: int) -> tuple[Placement, Placement, Placement]:
    """(input target, grid target, output placement) on one mesh dim."""
    if inp.is_shard(0) or grid.is_shard(0):
        return Shard(0), Shard(0), Shard(0)
    if inp.is_shard(1):
        return Shard(1), R, Shard(1)
    point = _point_shard(grid, num_spatial)
    if point is not None:
        return R, grid, Shard(2 + point)
    if _linear_partial(inp) and grid.is_replicate():
        return inp, R, inp
    return R, R, R


@register_rule(aten.grid_sampler_2d.default, aten.grid_sampler_3d.default)
def grid_sampler_rule(op: OpSchema) -> Sharding:
    """grid_sampler_Nd(input, grid, interpolation_mode, padding_mode, align_corners) -> out."""
    inp, grid = op.spec("input"), op.spec("grid")
    num_spatial = inp.ndim - 2
    decided = [_forward_mesh_dim(i, g, num_spatial) for i, g in zip(inp.placements, grid.placements)]
    inp_target, grid_target, out = (tuple(d[k] for d in decided) for k in range(3))
    return Sharding(inputs={"input": inp_target, "grid": grid_target}, outputs=(out,))


def _backward_mesh_dim(grad: Placement, inp: Placement, grid: Placement, num_spatial: int) -> tuple:
    """((grad_output, input, grid targets), (grad_input, grad_grid placements)) on one mesh dim."""
    if any(p.is_shard(0) for p in (grad, inp, grid)):
        return (Shard(0),) * 3, (Shard(0), Shard(0))
    if grad.is_shard(1) or inp.is_shard(1):
        return (Shard(1), Shard(1), R), (Shard(1), _SUM)
    point = _point_shard(grid, num_spatial)
    if point is None and isinstance(grad, Shard) and grad.dim >= 2:
        point = grad.dim - 2
    if point is not None:
        return (Shard(2 + point), R, Shard(1 + point)), (_SUM, Shard(1 + point))
    if _linear_partial(grad):
        return (grad, R, R), (grad, grad)
    if _linear_partial(inp) and grid.is_replicate():
        return (R, inp, R), (R, inp)
    return (R, R, R), (R, R)


@register_rule(aten.grid_sampler_2d_backward.default, aten.grid_sampler_3d_backward.default)
def grid_sampler_backward_rule(op: OpSchema) -> Sharding:
    """grid_sampler_Nd_backward(grad_output, input, grid, interpolation_mode, padding_mode, align_corners,
    output_mask) -> (grad_input, grad_grid)."""
    names = ("grad_output", "input", "grid")
    grad, inp, grid = (op.spec(name) for name in names)
    num_spatial = inp.ndim - 2
    decided = [_backward_mesh_dim(*ps, num_spatial) for ps in zip(grad.placements, inp.placements, grid.placements)]
    targets = {name: tuple(d[0][k] for d in decided) for k, name in enumerate(names)}
    grad_input, grad_grid = (tuple(d[1][k] for d in decided) for k in range(2))
    mask = op.arg("output_mask")
    outputs = (grad_input, grad_grid) if mask[0] else (grad_grid,)
    return Sharding(inputs=targets, outputs=outputs)


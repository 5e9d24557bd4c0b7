"""Ops that move or mask elements inside dims: tril/triu, flip, rot90, roll, unfold (and a note on tensor_split's
tensor overload at the end of the file).

Per mesh dim (Shard(d) of a dim the op leaves alone always stays, with no traffic):

    tril / triu (and _)   a Shard of either matrix dim also stays: each rank masks its block with the diagonal
                          shifted by its block's global (row offset - column offset)
    flip                  a Shard of a flipped dim is gathered on that mesh dim: rank r's output block comes
                          from the mirror position, which with torch.chunk's uneven blocks straddles ranks
    rot90                 a flip then a swap of the two plane dims: the unflipped one carries its Shard across
    roll                  a Shard of a rolled dim is gathered (every dim when ``dims`` is empty: a flat roll)
    unfold                a Shard of the unfolded dim is gathered (windows straddle blocks); the window dim
                          (new, last) is never sharded
    unfold_backward       the inverse map; a Shard of the unfolded or the window dim is gathered

Partial passes through all of them (they move, copy or zero-fill elements, the same on every rank), except
unfold_backward, which adds overlapping windows: only Partial(sum|avg) passes there.

``block`` (the global offset and length of this rank's block along a dim, read at run time) is shared with
the other rank-dependent rules (padding, diagonals, scatter_views).
"""

from __future__ import annotations

from dtensor_plus.placements import Replicate
from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import local_shape_and_offset

from .common import aten, normalize_dim
from .view_algebra import dim_map_out_dims, propagate

_LINEAR = ("sum", "avg")


def block(shape, mesh, placements, dim: int) -> tuple[int, int]:
    """(global offset, length) along ``dim`` of this rank's block under ``placements`` (called inside a local
    op: the coordinate is the only rank-dependent input, every decision before it is global)."""
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # a rank outside the mesh holds nothing
        return 0, 0
    sizes, offsets = local_shape_and_offset(shape, mesh.shape, placements, coordinate)
    return offsets[dim], sizes[dim]


def moved(placements, dim_map: dict, linear_only: bool = False) -> tuple[tuple, tuple]:
    """(input target, output placements) of a one-input op whose dim d lands on ``dim_map[d]`` (absent: that
    Shard is gathered). ``linear_only``: only Partial(sum|avg) passes, other Partials are reduced."""
    inputs, outputs = propagate(placements, dim_map_out_dims(placements, dim_map))
    if linear_only:
        inputs = tuple(Replicate() if p.is_partial() and p.reduce_op not in _LINEAR else p for p in inputs)
        outputs = tuple(Replicate() if p.is_partial() and p.reduce_op not in _LINEAR else p for p in outputs)
    return inputs, outputs


# -- tril / triu ----------------------------------------------------------------------------------------------


@register_rule(aten.tril.default, aten.triu.default, aten.tril_.default, aten.triu_.default)
def triangle_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    placements = spec.placements
    if spec.ndim < 2 or not any(p.is_shard(spec.ndim - 2) or p.is_shard(spec.ndim - 1) for p in placements):
        return Sharding(inputs=(None,), outputs=(placements,))
    shape, mesh, func, rows, cols = spec.shape, spec.mesh, op.func, spec.ndim - 2, spec.ndim - 1

    def shifted_triangle(x, diagonal=0):
        # Global (i, j) is local (i - r0, j - c0): j - i <= k globally is j' - i' <= k + r0 - c0 locally.
        row_offset, _ = block(shape, mesh, placements, rows)
        col_offset, _ = block(shape, mesh, placements, cols)
        return func(x, diagonal + row_offset - col_offset)

    return Sharding(inputs=(None,), outputs=(placements,), local_op=shifted_triangle)


# -- flip / roll ------------------------------------------------------------------------------------------------


@register_rule(aten.flip.default)
def flip_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    flipped = {normalize_dim(d, spec.ndim) for d in op.arg("dims")}
    inputs, outputs = moved(spec.placements, {d: d for d in range(spec.ndim) if d not in flipped})
    return Sharding(inputs=(inputs,), outputs=(outputs,))


@register_rule(aten.rot90.default)
def rot90_rule(op: OpSchema) -> Sharding:
    """rot90 by k quarter turns in the plane of dims (a, b) is a flip then a swap: k = 1 flips b, k = 3 flips a,
    k = 2 flips both, then (for odd k) a and b trade places."""
    spec = op.specs[0]
    k = op.arg("k", 1) % 4
    a, b = (normalize_dim(d, spec.ndim) for d in op.arg("dims", (0, 1)))
    dim_map = {d: d for d in range(spec.ndim)}
    flipped = {0: (), 1: (b,), 2: (a, b), 3: (a,)}[k]
    if k % 2:
        dim_map[a], dim_map[b] = b, a
    inputs, outputs = moved(spec.placements, {d: o for d, o in dim_map.items() if d not in flipped})
    return Sharding(inputs=(inputs,), outputs=(outputs,))


@register_rule(aten.roll.default)
def roll_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    dims = op.arg("dims", ())
    rolled = {normalize_dim(d, spec.ndim) for d in dims} if dims else set(range(spec.ndim))
    inputs, outputs = moved(spec.placements, {d: d for d in range(spec.ndim) if d not in rolled})
    return Sharding(inputs=(inputs,), outputs=(outputs,))


# -- unfold -----------------------------------------------------------------------------------------------------


@register_rule(aten.unfold.default, aten.unfold_copy.default)
def unfold_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    dim = normalize_dim(op.arg("dimension"), spec.ndim)
    inputs, outputs = moved(spec.placements, {d: d for d in range(spec.ndim) if d != dim})
    return Sharding(inputs=(inputs,), outputs=(outputs,))


@register_rule(aten.unfold_backward.default)
def unfold_backward_rule(op: OpSchema) -> Sharding:
    spec, sizes = op.specs[0], op.arg("input_sizes")
    dim = normalize_dim(op.arg("dim"), len(sizes))
    inputs, outputs = moved(spec.placements, {d: d for d in range(len(sizes)) if d != dim}, linear_only=True)
    return Sharding(inputs=(inputs,), outputs=(outputs,), shape_arg=1)


# -- tensor_split with its split points in a tensor -----------------------------------------------------------
#
# aten.tensor_split.tensor_indices_or_sections is CompositeImplicitAutograd: its C++ kernel runs at the autograd
# key, above DTensor.__torch_dispatch__, reads the points through the tensor's raw data pointer and splits
# through tensor_split.indices / .sections -> slices, whose rules keep self's layout. Plain CPU points (what
# torch asks for) therefore work on a DTensor self. Points given as a DTensor (a wrapper without storage) fail
# in that kernel ("its data is not allocated yet") before any rule could see them; reaching it would mean
# re-registering torch's own kernel (DESIGN principle 3 forbids patching torch): pass them as a plain tensor
# or a list.

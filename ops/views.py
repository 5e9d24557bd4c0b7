"""View and shape ops: views, permutations, squeeze/unsqueeze, expand/repeat, slicing, splitting, joining.

Shards follow the dimension algebra of ``view_algebra`` (per mesh dim; Partial and Replicate pass through,
since these ops only move, copy or zero-fill elements):

    view / _unsafe_view / view_copy   Shard(d) -> Shard(d') where d leads its group and the blocks align,
                                      else gathered (only that mesh dim); local view to the local shape
    permute / transpose / t           Shard(d) -> Shard(perm(d)), never any traffic
    squeeze / unsqueeze               dims renumbered; a Shard of a squeezed size-1 dim is gathered
    expand / repeat                   kept dims keep their Shard; a broadcast or repeated dim is gathered
    slice (narrow)                    Shard of the sliced dim kept when each rank's part of the slice is its
                                      torch.chunk block of the result (local slice at its offset), else gathered
    select                            sliced dim sharded -> Partial(sum): the owning rank's row, zeros elsewhere
    split / split_with_sizes / unbind the split dim is gathered; other Shards kept in every piece; a packed
                                      dim (StridedShard) cut where its groups end stays sharded (packed_parts.py)
    cat / stack                       the output takes the Shard (of a non-cat dim) of the largest input, or
                                      the Partial all inputs agree on; the cat dim is sharded only where the
                                      inputs are parts of a packed dim (split's backward: StridedShard out)
    index_select                      a sharded index gives a Shard of the indexed dim; a sharded indexed
                                      dim of self is gathered
    slice_backward / select_backward  the forward's rule, read backwards (zero-filled, so Partial passes)
    index_add                         source and index sharded alike along the index -> Partial(sum)

Every decision is a function of global metadata, so all ranks take the same collectives even where their
local blocks are uneven or empty (e.g. squeeze of a dim that is size 1 on some ranks only: the local op
squeezes the globally size-1 dims by number, never by local size).
"""

from __future__ import annotations

import functools

import torch

from dtensor_plus import views
from dtensor_plus.placements import Partial, Replicate, Shard
from dtensor_plus.rules import OpSchema, Sharding, register_rule
from dtensor_plus.spec import local_shape_and_offset

from .common import aten, normalize_dim, without_partial
from .packed_parts import cat_parts, local_split, same_strided, split_parts
from .view_algebra import (aligned_out_dims, always, blocks_align, dim_map_out_dims, infer_shape, local_slice,
                           propagate, slice_range, sliced_out_dims, strided_view_placements, view_out_dims)


@register_rule(aten.detach.default, aten.alias.default, aten.lift_fresh.default, aten.alias_copy.default,
               aten.detach_copy.default, strided="as_shard")
def identity_rule(op: OpSchema) -> Sharding:
    """Ops that return the same tensor (a new alias): any layout passes through untouched."""
    return Sharding(inputs=(None,), outputs=(op.specs[0].placements,))


def _map_rule(op: OpSchema, dim_map: dict, num_outputs: int = 1, **extra) -> Sharding:
    """One input whose dims move whole: ``dim_map[d]`` is input dim d's output dim (None: gather it)."""
    spec = op.specs[0]
    inputs, outputs = propagate(spec.placements, dim_map_out_dims(spec.placements, dim_map))
    return Sharding(inputs=(inputs,), outputs=(outputs,) * num_outputs, **extra)


def _block(spec_shape, mesh, placements, dim: int) -> tuple[int, int]:
    """(offset, length) along ``dim`` of this rank's block (called at run time, inside a local op)."""
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # a rank outside the mesh holds nothing
        return 0, 0
    shape, offset = local_shape_and_offset(spec_shape, mesh.shape, placements, coordinate)
    return offset[dim], shape[dim]


# -- views ------------------------------------------------------------------------------------------------


def _local_view(func):
    """The view of this rank's block, or where its strides admit no view (e.g. after a layout change; a fake
    block under torch.compile raises ValueError) a reshaped copy, marked so that writes into the view reach the
    block on this rank (dtensor_plus/views.py: whether it copies is this rank's own, so it is handled here)."""

    call = func._op  # OpOverload.__call__ only forwards to it: one Python frame less per view

    @views.aliasing
    def view(x, size, *rest, **kwargs):
        try:
            return call(x, size)
        except (RuntimeError, ValueError):
            return views.copied(x.reshape(size), x)

    return view


_VIEW_LOCAL = {
    aten.view.default: _local_view(aten.view.default),
    aten._unsafe_view.default: _local_view(aten._unsafe_view.default),
    aten.view_copy.default: _local_view(aten.view_copy.default),
    aten._reshape_alias.default: _local_view(aten.view.default),  # local strides differ from the global ones
}


@register_rule(*_VIEW_LOCAL, strided="native")
def view_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    out_shape = infer_shape(spec.shape.numel(), op.arg("size"))
    out_dims = view_out_dims(tuple(spec.shape), out_shape, spec.placements, op.mesh_shape)
    inputs, outputs = propagate(spec.placements, out_dims)
    strided = strided_view_placements(tuple(spec.shape), out_shape, spec.placements, op.mesh_shape, out_dims)
    if strided:  # a StridedShard made, kept or unmade: the input stays as it is; else it is gathered
        keep = {k: not p.is_replicate() for k, p in strided.items()}
        inputs = tuple(spec.placements[k] if keep.get(k) else (Replicate() if k in keep else q) for k, q in enumerate(inputs))
        outputs = tuple(strided.get(k, q) for k, q in enumerate(outputs))
    return Sharding(inputs=(inputs,), outputs=(outputs,), shape_arg=1, local_op=_VIEW_LOCAL[op.func])


@register_rule(aten.view.dtype)
def view_dtype_rule(op: OpSchema) -> Sharding:
    """Reinterpreting bits is not linear (Partial is reduced); a changed element size rescales the last dim,
    whose Shard survives where the blocks cover the same bytes."""
    spec, dtype = op.specs[0], op.arg("dtype")
    if dtype == spec.dtype:
        return identity_rule(op)
    placements = without_partial(spec.placements)
    last = spec.ndim - 1
    carriers = {d: (d, always) for d in range(last)}
    if spec.ndim:
        out_last = spec.shape[last] * spec.dtype.itemsize // dtype.itemsize
        aligns = functools.partial(blocks_align, spec.shape[last], spec.dtype.itemsize, out_last, dtype.itemsize)
        carriers[last] = (last, aligns)
    inputs, outputs = propagate(placements, aligned_out_dims(placements, op.mesh_shape, carriers))
    return Sharding(inputs=(inputs,), outputs=(outputs,))


# -- dims that move whole -----------------------------------------------------------------------------------


@register_rule(aten.permute.default, aten.permute_copy.default, strided="as_shard")
def permute_rule(op: OpSchema) -> Sharding:
    ndim = op.specs[0].ndim
    dims = [normalize_dim(d, ndim) for d in op.arg("dims")]
    return _map_rule(op, {d: i for i, d in enumerate(dims)})


@register_rule(aten.transpose.int, aten.transpose_copy.int, aten.t.default, aten.t_copy.default, strided="as_shard")
def transpose_rule(op: OpSchema) -> Sharding:
    ndim = op.specs[0].ndim
    if op.func in (aten.t.default, aten.t_copy.default):
        d0, d1 = (0, 1) if ndim == 2 else (0, 0)
    else:
        d0, d1 = normalize_dim(op.arg("dim0"), ndim), normalize_dim(op.arg("dim1"), ndim)
    dim_map = {d: d for d in range(ndim)}
    dim_map[d0], dim_map[d1] = d1, d0
    return _map_rule(op, dim_map)


@register_rule(aten.unsqueeze.default, aten.unsqueeze_copy.default, strided="as_shard")
def unsqueeze_rule(op: OpSchema) -> Sharding:
    ndim = op.specs[0].ndim
    new = normalize_dim(op.arg("dim"), ndim + 1)
    return _map_rule(op, {d: d + (d >= new) for d in range(ndim)})


_SQUEEZE_DIMS = {
    **dict.fromkeys((aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims), aten.squeeze.dims),
    **dict.fromkeys((aten.squeeze_copy.default, aten.squeeze_copy.dim, aten.squeeze_copy.dims),
                    aten.squeeze_copy.dims),
}


@register_rule(*_SQUEEZE_DIMS)
def squeeze_rule(op: OpSchema) -> Sharding:
    """Squeezes the dims of global size 1, by number: a local block of size 1 in a longer dim stays."""
    spec = op.specs[0]
    shape, ndim = spec.shape, spec.ndim
    asked = op.arg("dim", None)
    candidates = range(ndim) if asked is None else [asked] if isinstance(asked, int) else asked
    removed = sorted({normalize_dim(d, ndim) for d in candidates if ndim and shape[normalize_dim(d, ndim)] == 1})
    dim_map = {d: d - sum(r < d for r in removed) for d in range(ndim) if d not in removed}
    squeeze_dims = _SQUEEZE_DIMS[op.func]

    @views.aliasing  # always a view of the block (squeeze_copy is no view op)
    def squeeze_by_number(x, *args, **kwargs):
        return squeeze_dims(x, removed)

    return _map_rule(op, dim_map, local_op=squeeze_by_number)


@register_rule(aten.expand.default, aten.expand_copy.default, strided="as_shard")
def expand_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    size = op.arg("size")
    lead = len(size) - spec.ndim
    dim_map = {d: d + lead for d in range(spec.ndim) if size[d + lead] in (-1, spec.shape[d])}
    return _map_rule(op, dim_map, shape_arg=1)


@register_rule(aten.repeat.default)
def repeat_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    repeats = op.arg("repeats")
    lead = len(repeats) - spec.ndim
    return _map_rule(op, {d: d + lead for d in range(spec.ndim) if repeats[d + lead] == 1})


# -- slicing --------------------------------------------------------------------------------------------------


def _whole_slice(func, dim: int, backward: bool = False):
    """The local op of a slice (or its backward) that covers the whole sharded dim: each block whole, found
    from the block's own length, never from offsets. This is what keeps a StridedShard right (strided.py reads
    it as a Shard for these rules, but its blocks have other lengths: a zigzag block of 7 rows on 4 ranks is
    2 rows where Shard's is 1; the GPT's ``pos_emb[:T]`` with T == block_size, in backward, met exactly that)."""

    def whole_backward(g, local_sizes, *args, **kwargs):
        return func(g, local_sizes, dim, 0, local_sizes[dim], 1)

    @views.aliasing  # a view of the block, as the slice is
    def whole(x, *args, **kwargs):
        return func(x, dim, 0, x.shape[dim], 1)

    return whole_backward if backward else whole


@register_rule(aten.slice.Tensor, aten.slice_copy.Tensor, strided="as_shard")
def slice_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    dim, step = normalize_dim(op.arg("dim", 0), spec.ndim), op.arg("step", 1)
    start, length = slice_range(spec.shape[dim], op.arg("start"), op.arg("end"), step)
    out_dims = sliced_out_dims(spec.placements, op.mesh_shape, spec.shape, dim, start, step, length)
    inputs, outputs = propagate(spec.placements, out_dims)
    if not any(p.is_shard(dim) for p in inputs):
        return Sharding(inputs=(inputs,), outputs=(outputs,))
    if length == spec.shape[dim]:
        return Sharding(inputs=(inputs,), outputs=(outputs,), local_op=_whole_slice(op.func, dim))
    shape, mesh, func = spec.shape, spec.mesh, op.func

    @views.aliasing  # always a view of the block
    def local_slice_op(x, *args, **kwargs):
        lo, hi, _ = local_slice(_block(shape, mesh, inputs, dim), start, step, length)
        return func(x, dim, lo, hi, step)

    return Sharding(inputs=(inputs,), outputs=(outputs,), local_op=local_slice_op)


@register_rule(aten.slice_backward.default, strided="as_shard")
def slice_backward_rule(op: OpSchema) -> Sharding:
    """Zeros of the input's shape around the gradient: the slice rule read from its output side."""
    grad, sizes = op.specs[0], op.arg("input_sizes")
    dim, step = normalize_dim(op.arg("dim"), len(sizes)), op.arg("step")
    start, length = slice_range(sizes[dim], op.arg("start"), op.arg("end"), step)
    out_dims = sliced_out_dims(grad.placements, op.mesh_shape, sizes, dim, start, step, length)
    inputs, outputs = propagate(grad.placements, out_dims)
    if not any(p.is_shard(dim) for p in outputs):
        return Sharding(inputs=(inputs,), outputs=(outputs,), shape_arg=1)
    if length == sizes[dim]:
        return Sharding(inputs=(inputs,), outputs=(outputs,), shape_arg=1,
                        local_op=_whole_slice(aten.slice_backward.default, dim, backward=True))
    mesh = grad.mesh

    def local_slice_backward(g, local_sizes, *args, **kwargs):
        lo, hi, _ = local_slice(_block(sizes, mesh, outputs, dim), start, step, length)
        return aten.slice_backward.default(g, local_sizes, dim, lo, hi, step)

    return Sharding(inputs=(inputs,), outputs=(outputs,), shape_arg=1, local_op=local_slice_backward)


@register_rule(aten.select.int, aten.select_copy.int)
def select_rule(op: OpSchema) -> Sharding:
    """Selecting from a sharded dim: the owner's row plus zeros elsewhere, a Partial(sum) of the output size
    instead of gathering the input. (Exact: x + 0 == x; only a -0.0 would come back as +0.0.)"""
    spec = op.specs[0]
    dim = normalize_dim(op.arg("dim"), spec.ndim)
    index = op.arg("index")
    index += spec.shape[dim] if index < 0 else 0
    outputs = tuple(Partial("sum") if p.is_shard(dim) else Shard(p.dim - (p.dim > dim)) if isinstance(p, Shard) else p
                    for p in spec.placements)
    if not any(p.is_shard(dim) for p in spec.placements):
        return Sharding(inputs=(None,), outputs=(outputs,))
    shape, mesh, placements, func = spec.shape, spec.mesh, spec.placements, op.func

    def select_owned(x, *args, **kwargs):
        offset, length = _block(shape, mesh, placements, dim)
        if offset <= index < offset + length:
            return func(x, dim, index - offset)
        return x.new_zeros(x.shape[:dim] + x.shape[dim + 1 :])

    return Sharding(inputs=(None,), outputs=(outputs,), local_op=select_owned)


@register_rule(aten.select_backward.default)
def select_backward_rule(op: OpSchema) -> Sharding:
    sizes = op.arg("input_sizes")
    dim = normalize_dim(op.arg("dim"), len(sizes))
    return _map_rule(op, {d: d + (d >= dim) for d in range(len(sizes) - 1)}, shape_arg=1)


# -- splitting and joining ----------------------------------------------------------------------------------


@register_rule(aten.split.Tensor, aten.split_copy.Tensor, aten.split_with_sizes.default,
               aten.split_with_sizes_copy.default, aten.unsafe_split.Tensor, strided="native")
def split_rule(op: OpSchema) -> Sharding:
    """A packed dim (StridedShard) cut where its groups end stays sharded in every part, locally
    (ops/packed_parts.py); any other Shard of the split dim is gathered. Other dims keep their layout."""
    spec = op.specs[0]
    dim = normalize_dim(op.arg("dim", 0), spec.ndim)
    split = op.arg("split_sizes" if "split_sizes" in op.record.arg_names else "split_size")  # by overload
    if isinstance(split, (list, tuple)):
        sizes = list(split)
    else:
        sizes = [len(t) for t in torch.empty(spec.shape[dim], device="meta").split(split)]
    parts = split_parts(spec, dim, sizes)
    placements = tuple(Replicate() if p.is_strided_shard() and p.dim == dim and k not in parts else p
                       for k, p in enumerate(spec.placements))
    inputs, output = propagate(placements, dim_map_out_dims(placements, {d: d for d in range(spec.ndim) if d != dim}))
    outputs = tuple(tuple(parts[k][i] if k in parts else q for k, q in enumerate(output)) for i in range(len(sizes)))
    if not parts:
        return Sharding(inputs=(inputs,), outputs=outputs)
    (mesh_dim, pieces), = parts.items()  # one mesh dim alone splits a packed dim
    return Sharding(inputs=(inputs,), outputs=outputs, local_op=local_split(op.func, spec.mesh, mesh_dim, dim, sizes, pieces))


@register_rule(aten.unbind.int, aten.unbind_copy.int)
def unbind_rule(op: OpSchema) -> Sharding:
    spec = op.specs[0]
    dim = normalize_dim(op.arg("dim", 0), spec.ndim)
    dim_map = {d: d - (d > dim) for d in range(spec.ndim) if d != dim}
    return _map_rule(op, dim_map, num_outputs=spec.shape[dim])


def _join(specs, in_dims: dict, mesh_ndim: int):
    """Per mesh dim: the Partial every partial input agrees on (Replicate inputs are partitioned into it for
    free), else the Shard of the largest input whose dim survives (``in_dims``: output dim -> input dim, the
    joined dim left out), else Replicate. Returns (one target for every input, output placements)."""
    target, output = [], []
    out_dims = {d: o for o, d in in_dims.items()}
    for mesh_dim in range(mesh_ndim):
        ps = [s.placements[mesh_dim] for s in specs]
        reduce_ops = {p.reduce_op for p in ps if p.is_partial()}
        sharded = [(s.shape.numel(), out_dims[p.dim])
                   for s, p in zip(specs, ps) if isinstance(p, Shard) and p.dim in out_dims]
        if len(reduce_ops) == 1:
            want = here = Partial(reduce_ops.pop())
        elif not reduce_ops and sharded:
            want = Shard(max(sharded)[1])
            here = Shard(in_dims[want.dim])
        else:
            want = here = Replicate()
        output.append(want)
        target.append(here)
    return tuple(target), tuple(output)


@register_rule(aten.cat.default, strided="native")
def cat_rule(op: OpSchema) -> Sharding:
    """Inputs agree on the output's layout; 1-d empty inputs (which cat skips) stay as they are. Parts of a
    packed dim (split's backward: Shard or StridedShard pieces of equal groups) join into its StridedShard
    with no data moved (ops/packed_parts.py); a StridedShard of another dim passes where every input holds
    the same one, else it is gathered."""
    specs = op.specs
    skipped = [s.ndim == 1 and s.shape[0] == 0 for s in specs]
    if all(skipped):
        skipped = [False] * len(specs)
    joined = [s for s, skip in zip(specs, skipped) if not skip]
    ndim = joined[0].ndim
    dim = normalize_dim(op.arg("dim", 0), ndim)
    packed = cat_parts(joined, dim, op.mesh_shape)
    kept = packed | same_strided(joined, dim, packed)
    plain = [s.with_placements(tuple(Replicate() if k in kept or p.is_strided_shard() else p for k, p in enumerate(s.placements)))
             for s in joined]
    target, output = _join(plain, {d: d for d in range(ndim) if d != dim}, len(op.mesh_shape))
    output = tuple(kept.get(k, q) for k, q in enumerate(output))

    def target_of(spec):
        return tuple(spec.placements[k] if k in kept else q for k, q in enumerate(target))

    return Sharding(inputs=tuple(None if skip else target_of(s) for s, skip in zip(specs, skipped)), outputs=(output,))



@register_rule(aten.stack.default)
def stack_rule(op: OpSchema) -> Sharding:
    ndim = op.specs[0].ndim
    dim = normalize_dim(op.arg("dim", 0), ndim + 1)
    target, output = _join(op.specs, {d + (d >= dim): d for d in range(ndim)}, len(op.mesh_shape))
    return Sharding(inputs=(target,) * len(op.specs), outputs=(output,))


# -- indexing -------------------------------------------------------------------------------------------------


@register_rule(aten.index_select.default)
def index_select_rule(op: OpSchema) -> Sharding:
    """A sharded indexed dim of self is gathered; otherwise a sharded index shards the indexed dim of the
    output (torch.chunk of the index is torch.chunk of that dim), unless self is sharded on that mesh dim."""
    spec, index = op.spec("self"), op.spec("index")  # index None: a plain 0-d tensor (a replicated scalar)
    dim = normalize_dim(op.arg("dim"), spec.ndim)
    self_target, index_target, output = [], [], []
    for mesh_dim, p in enumerate(spec.placements):
        q = index.placements[mesh_dim] if index is not None else Replicate()
        p = Replicate() if p.is_shard(dim) else p
        by_index = p.is_replicate() and isinstance(q, Shard)
        self_target.append(p)
        index_target.append(q if by_index else Replicate())
        output.append(Shard(dim) if by_index else p)
    inputs = {"self": tuple(self_target)}
    if index is not None:
        inputs["index"] = tuple(index_target)
    return Sharding(inputs=inputs, outputs=(tuple(output),))


def _index_add_placements(p, q, r, dim: int):
    """(self, index, source, output) placements on one mesh dim of index_add(self, dim, index, source)."""
    if r.is_shard(dim) and isinstance(q, Shard) and (p.is_replicate() or p == Partial("sum")):
        return Partial("sum"), q, r, Partial("sum")  # each rank adds its rows: the partial sums add up
    if isinstance(p, Shard) and p.dim != dim:
        return p, Replicate(), p, p
    if p.is_replicate() and isinstance(r, Shard) and r.dim != dim:
        return r, Replicate(), r, r
    reduce_ops = {x.reduce_op for x in (p, r) if x.is_partial()}
    if len(reduce_ops) == 1 and reduce_ops <= {"sum", "avg"}:  # self + scatter(source) is linear in both
        partial = Partial(reduce_ops.pop())
        return partial, Replicate(), partial, partial
    return Replicate(), Replicate(), Replicate(), Replicate()


@register_rule(aten.index_add.default, aten.index_add_.default)
def index_add_rule(op: OpSchema) -> Sharding:
    """The backward of index_select: a gradient sharded along the index accumulates as Partial(sum)."""
    spec, index, source = op.spec("self"), op.spec("index"), op.spec("source")  # None: a plain 0-d tensor
    dim = normalize_dim(op.arg("dim"), spec.ndim)
    rows = []
    for mesh_dim, p in enumerate(spec.placements):
        q = index.placements[mesh_dim] if index is not None else Replicate()
        r = source.placements[mesh_dim] if source is not None else Replicate()
        rows.append(_index_add_placements(p, q, r, dim))
    self_t, index_t, source_t, output = (tuple(column) for column in zip(*rows))
    inputs = {"self": self_t, "index": index_t, "source": source_t}
    return Sharding(inputs={name: inputs[name] for name in op.names}, outputs=(output,))  # only the DTensors

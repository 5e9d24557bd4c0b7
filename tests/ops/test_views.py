"""View and shape rules (ops/views.py, ops/view_algebra.py): the algebra as pure metadata, then outputs and
gradients against one device on real gloo ranks (views that split and merge sharded dims, permutations,
squeeze/unsqueeze, expand/repeat, slicing, splitting, joining, index_select), and the collective counts of
the layouts that must move nothing."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard, comm_mode
from dtensor_plus.ops.view_algebra import blocks_align, slice_aligns, view_groups
from dtensor_plus.placements import StridedShard
from dtensor_plus.testing.rules import decide
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for

aten = torch.ops.aten
R = Replicate()
WORLD_SIZES = (2, 3, 4)
EXAMPLES = 30  # per world size and property: ~90 per property; the rest of the file is pool start-up

# ---------------------------------------------------------------- the algebra as pure metadata


def _decide(func, shape, placements, *args, mesh_shape=(4,)):
    """(input target, output placements) the registered rule picks for ``func(x, *args)``."""
    inputs, outputs = decide(func, (shape, tuple(placements)), *args, mesh_shape=mesh_shape)
    return inputs[0], outputs[0]


def test_view_groups():
    assert view_groups((4, 6, 8), (24, 8)) == [((0, 1), (0,)), ((2,), (1,))]
    assert view_groups((2, 3, 12), (2, 3, 3, 4)) == [((0,), (0,)), ((1,), (1,)), ((2,), (2, 3))]
    assert view_groups((1, 6), (6, 1)) == [((0,), ()), ((1,), (0,)), ((), (1,))]
    assert view_groups((1, 4), (1, 2, 2)) == [((0,), (0,)), ((1,), (1, 2))]
    assert view_groups((4, 6), (6, 4)) == [((0, 1), (0, 1))]
    assert view_groups((0, 3), (3, 0)) is None


def test_blocks_align_exactly():
    assert blocks_align(4, 6, 24, 1, [2])  # (B, T) -> (B*T) with B % n == 0
    assert not blocks_align(3, 4, 12, 1, [2])  # B = 3 on 2 ranks: 8 + 4 rows against 6 + 6
    assert blocks_align(6, 1, 3, 2, [3])  # (H*Dh) -> (H, Dh), H % n == 0
    assert not blocks_align(6, 1, 3, 2, [2])
    assert blocks_align(6, 2, 12, 1, [2]) and not blocks_align(6, 2, 12, 1, [2, 2])  # nested: inner level fails
    assert blocks_align(3, 2, 6, 1, [4])  # uneven but aligned: rows 1,1,1,0 of 2 == torch.chunk(6, 4): 2,2,2,0
    assert not blocks_align(3, 5, 15, 1, [4])  # 5,5,5,0 against 4,4,4,3
    assert slice_aligns(8, 0, 1, 7, [2]) and not slice_aligns(8, 1, 1, 7, [2])  # x[:-1] keeps, x[1:] not


def test_view_rule_decisions():
    # (B, T, D) -> (B*T, D): B sharded evenly keeps; T, not the lead of its group, becomes strided
    assert _decide(aten.view.default, (4, 6, 8), (Shard(0),), [24, 8]) == ((Shard(0),), (Shard(0),))
    assert _decide(aten.view.default, (4, 6, 8), (Shard(1),), [24, 8]) == ((Shard(1),), (StridedShard(0, 4),))
    # ... and back where the groups end; a split whose dim holds the inner factor keeps it strided (two groups
    # of 6 in each 12); one that cuts the inner factor gathers, a view beside it keeps it
    strided = (StridedShard(0, 4),)
    assert _decide(aten.view.default, (24, 8), strided, [4, 6, 8]) == (strided, (Shard(1),))
    assert _decide(aten.view.default, (24, 8), strided, [2, 12, 8]) == (strided, (StridedShard(1, 2),))
    assert _decide(aten.view.default, (24, 8), strided, [3, 8, 8]) == ((R,), (R,))
    assert _decide(aten.view.default, (24, 8), strided, [192]) == ((R,), (R,))
    assert _decide(aten.view.default, (24, 8), strided, [24, 2, 4]) == (strided, strided)
    # B on dp (whole blocks of it) and T on tp: the rows of each dp block are strided on tp, and back
    nested = (Shard(0), StridedShard(0, 2))
    assert _decide(aten.view.default, (4, 6, 8), (Shard(0), Shard(1)), [24, 8], mesh_shape=(2, 2)) == (
        (Shard(0), Shard(1)), nested)
    assert _decide(aten.view.default, (24, 8), nested, [4, 6, 8], mesh_shape=(2, 2)) == (nested, (Shard(0), Shard(1)))
    # ... but not where dp cuts B unevenly, or where tp shards B and dp T (nesting order)
    assert _decide(aten.view.default, (3, 6, 8), (Shard(0), Shard(1)), [18, 8], mesh_shape=(2, 2)) == (
        (R, R), (R, R))
    assert _decide(aten.view.default, (4, 6, 8), (Shard(1), Shard(0)), [24, 8], mesh_shape=(2, 2)) == (
        (R, Shard(0)), (R, Shard(0)))
    assert _decide(aten.view.default, (3, 6, 8), (Shard(0),), [18, 8], mesh_shape=(2,)) == ((R,), (R,))
    # (B, T, H*Dh) -> (B, T, H, Dh) sharded on H*Dh
    assert _decide(aten.view.default, (2, 3, 8), (Shard(2),), [2, 3, 4, 2]) == ((Shard(2),), (Shard(2),))
    assert _decide(aten.view.default, (2, 3, 6), (Shard(2),), [2, 3, 3, 2], mesh_shape=(2,)) == ((R,), (R,))
    # only the gathered mesh dim moves; the inner level of a nested shard goes first
    assert _decide(aten.view.default, (3, 4, 6), (Shard(0), Shard(2)), [12, 2, 3], mesh_shape=(2, 2)) == (
        (R, Shard(2)), (R, Shard(1)))
    assert _decide(aten.view.default, (6, 2), (Shard(0), Shard(0)), [12], mesh_shape=(2, 2)) == (
        (Shard(0), R), (Shard(0), R))
    assert _decide(aten.view.default, (4, 6), (Partial(), Shard(0)), [-1], mesh_shape=(2, 2)) == (
        (Partial(), Shard(0)), (Partial(), Shard(0)))


@st.composite
def dropped_size_one_views(draw):
    """A view whose input has size-1 dims the output merges away ((2, 2, 3, 12, 1) -> (12, 12), tensorinv's
    reshape), on meshes of 2 and 3 dims, every mesh dim free to shard any input dim (size-1 ones included)."""
    factors = draw(st.lists(st.sampled_from([2, 3, 4, 6]), min_size=1, max_size=4))
    shape = list(factors)
    for at in draw(st.lists(st.integers(0, len(factors)), min_size=1, max_size=3)):
        shape.insert(at, 1)
    out_shape = _regroup(draw, factors)
    mesh_shape = draw(st.sampled_from([(2, 2), (2, 3), (2, 2, 2)]))
    placements = draw(st.lists(st.sampled_from([R, Partial()] + [Shard(d) for d in range(len(shape))]),
                               min_size=len(mesh_shape), max_size=len(mesh_shape)))
    return tuple(shape), out_shape, tuple(placements), mesh_shape


@settings(max_examples=200)
@given(case=dropped_size_one_views())
def test_view_dropping_size_one_dims_decides(case):
    """Regression: a Shard of a size-1 dim the view drops, behind another mesh dim sharding it, indexed the
    (empty) output side of its group (IndexError in _outer_blocks). Now such a mesh dim is gathered."""
    shape, out_shape, placements, mesh_shape = case
    (target,), (out,) = decide(aten.view.default, (shape, placements), list(out_shape), mesh_shape=mesh_shape)
    for p_in, p_out in zip(target, out):
        assert not (isinstance(p_out, Shard) and p_out.dim >= len(out_shape))
        if isinstance(p_in, Shard) and shape[p_in.dim] == 1:
            assert p_out == R


def test_tensorinv_of_a_size_one_dim_sharded_twice():
    """linalg.tensorinv's OpInfo sample on a 2x2 mesh, its size-1 last dim sharded on both mesh dims."""
    run_on_ranks(4, _check_view, (2, 2), (2, 2, 3, 12, 1), (Shard(4), Shard(4)), (12, 12), False, 3)


def test_dim_rule_decisions():
    assert _decide(aten.permute.default, (2, 3, 4), (Shard(2), Partial("max")), [2, 0, 1], mesh_shape=(2, 2)) == (
        (Shard(2), Partial("max")), (Shard(0), Partial("max")))
    assert _decide(aten.squeeze.default, (1, 5, 1), (Shard(0), Shard(1)), mesh_shape=(2, 2)) == (
        (R, Shard(1)), (R, Shard(0)))
    assert _decide(aten.expand.default, (3, 1), (Shard(0), Shard(1)), [2, 3, 4], mesh_shape=(2, 2)) == (
        (Shard(0), R), (Shard(1), R))
    assert _decide(aten.select.int, (4, 6), (Shard(1),), 1, 2) == ((Shard(1),), (Partial(),))
    assert _decide(aten.slice.Tensor, (2, 8), (Shard(1),), 1, 0, -1, mesh_shape=(2,)) == ((Shard(1),), (Shard(1),))
    assert _decide(aten.slice.Tensor, (2, 8), (Shard(1),), 1, 1, None, mesh_shape=(2,)) == ((R,), (R,))


# ---------------------------------------------------------------- views on ranks, against one device


def _whole(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _check(fn, *args, backward=True):
    """The forward takes no fallback (every aten op it reaches has a rule), then outputs and gradients."""
    with comm_mode() as comm:
        fn(*args)
    assert not comm.fallbacks, comm.fallbacks
    assert_spmd_equal(fn, *args, backward=backward)


def _check_view(mesh_shape, shape, placements, out_shape, transpose, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(_whole(seed, shape), mesh, placements, requires_grad=True)
    if transpose:  # a non-contiguous input: reshape becomes clone + _unsafe_view
        _check(lambda t: t.transpose(0, -1).reshape(out_shape), x)
    else:
        _check(lambda t: t.view(out_shape), x)


def _regroup(draw, factors):
    """Adjacent factors multiplied together at random cut points: one shape of numel prod(factors)."""
    cuts = draw(st.lists(st.booleans(), min_size=len(factors) - 1, max_size=len(factors) - 1))
    bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [len(factors)]
    return tuple(math.prod(factors[a:b]) for a, b in zip(bounds, bounds[1:]))


@st.composite
def view_cases(draw, world_size):
    """A view that splits and merges dims (sizes often multiples of mesh dims, sometimes 0 or 1)."""
    mesh_shape = draw(mesh_shapes(world_size))
    factors = draw(st.lists(st.sampled_from([1, 2, 2, 3, 4, 4, 6, 0]), min_size=1, max_size=5))
    shape, out_shape = _regroup(draw, factors), _regroup(draw, factors)
    placements = draw(placements_for(len(shape), len(mesh_shape), partial=True))
    return mesh_shape, shape, placements, out_shape, draw(st.booleans()), draw(st.integers(0, 2**16))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_view_and_reshape(world_size, data):
    run_on_ranks(world_size, _check_view, *data.draw(view_cases(world_size)))


# ---------------------------------------------------------------- whole-dim moves


_SPECIAL = {  # the ops not spelled t.<name>(*args)
    "squeeze_copy": lambda t, a: torch.squeeze_copy(t, *a),
    "contiguous": lambda t, a: t.transpose(*a).contiguous(),
    "slice": lambda t, a: t[(slice(None),) * a[0] + (slice(*a[1:]),)],
}
_DIM_OPS = ("permute", "transpose", "movedim", "unsqueeze", "squeeze", "squeeze_copy", "expand", "repeat", "flatten",
            "unflatten", "contiguous", "t")


def _check_op(mesh_shape, shape, placements, name, args, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(_whole(seed, shape), mesh, placements, requires_grad=True)
    _check(lambda t: _SPECIAL[name](t, args) if name in _SPECIAL else getattr(t, name)(*args), x)


@st.composite
def dim_op_args(draw, shape):
    ndim = len(shape)
    dim = st.integers(-ndim, ndim - 1)
    name = draw(st.sampled_from(_DIM_OPS))
    if name == "permute":
        return name, tuple(draw(st.permutations(range(ndim))))
    if name in ("transpose", "movedim", "contiguous"):
        return name, (draw(dim), draw(dim))
    if name == "unsqueeze":
        return name, (draw(st.integers(-ndim - 1, ndim)),)
    if name in ("squeeze", "squeeze_copy"):
        kind = draw(st.sampled_from(["all", "dim", "dims"]))
        if kind == "dims":
            return name, (tuple(draw(st.sets(st.integers(0, ndim - 1), max_size=ndim))),)
        return name, (draw(dim),) if kind == "dim" else ()
    if name == "expand":
        return name, (draw(st.integers(1, 2)),) + tuple(3 if s == 1 and draw(st.booleans()) else s for s in shape)
    if name == "repeat":
        return name, tuple(draw(st.lists(st.integers(1, 2), min_size=ndim, max_size=ndim + 1)))
    if name == "flatten":
        return name, tuple(sorted(draw(st.lists(st.integers(0, ndim - 1), min_size=2, max_size=2))))
    if name == "unflatten":
        d = draw(st.integers(0, ndim - 1))
        if shape[d] == 0:
            return name, (d, (-1, 1))
        return name, (d, (draw(st.sampled_from([f for f in (1, 2, 3) if shape[d] % f == 0])), -1))
    return "t" if ndim <= 2 else "transpose", () if ndim <= 2 else (0, 1)


@st.composite
def layout_cases(draw, world_size, ops, min_ndim=1):
    mesh_shape = draw(mesh_shapes(world_size))
    shape = tuple(draw(st.lists(st.sampled_from([0, 1, 1, 2, 3, 4, 5, 6]), min_size=min_ndim, max_size=4)))
    placements = draw(placements_for(len(shape), len(mesh_shape), partial=True))
    name, args = draw(ops(shape))
    return mesh_shape, shape, placements, name, args, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_dim_moves(world_size, data):
    run_on_ranks(world_size, _check_op, *data.draw(layout_cases(world_size, dim_op_args)))


# ---------------------------------------------------------------- slicing and splitting


@st.composite
def slice_op_args(draw, shape):
    ndim = len(shape)
    d = draw(st.integers(0, ndim - 1))
    size = shape[d]
    name = draw(st.sampled_from(["slice", "narrow", "select", "split", "chunk", "unbind", "tensor_split"]))
    if name == "select" and size:
        return name, (d, draw(st.integers(-size, size - 1)))
    if name == "narrow":
        start = draw(st.integers(0, size))
        return name, (d, start, draw(st.integers(0, size - start)))
    if name == "split":
        return name, (draw(st.integers(1, 4)) if draw(st.booleans()) else _sizes_summing_to(draw, size), d)
    if name in ("chunk", "tensor_split"):
        return name, (draw(st.integers(1, 4)), d)
    if name == "unbind":
        return name, (d,)
    bound = st.one_of(st.none(), st.integers(-size - 1, size + 1))
    return "slice", (d, draw(bound), draw(bound), draw(st.integers(1, 3)))


def _sizes_summing_to(draw, size):
    cuts = sorted(draw(st.lists(st.integers(0, size), max_size=3)))
    return [b - a for a, b in zip([0] + cuts, cuts + [size])]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_slicing_and_splitting(world_size, data):
    run_on_ranks(world_size, _check_op, *data.draw(layout_cases(world_size, slice_op_args)))


# ---------------------------------------------------------------- joining and indexing


def _check_join(mesh_shape, shapes, placements, name, dim, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    xs = [make_dtensor(_whole(seed + i, shape), mesh, layout, requires_grad=True)
          for i, (shape, layout) in enumerate(zip(shapes, placements))]
    fn = torch.cat if name == "cat" else torch.stack
    # cat's backward makes the gradient of a 1-d empty input with at::zeros: a plain tensor (autograd's doing)
    backward = not (name == "cat" and any(s == (0,) for s in shapes))
    _check(lambda *ts: fn(ts, dim), *xs, backward=backward)


@st.composite
def join_cases(draw, world_size):
    mesh_shape = draw(mesh_shapes(world_size))
    shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 5]), min_size=1, max_size=3))
    name = draw(st.sampled_from(["cat", "stack"]))
    dim = draw(st.integers(0, len(shape) - (name == "cat")))
    shapes = []
    for _ in range(draw(st.integers(1, 3))):
        if name == "cat":
            shape = shape[:dim] + [draw(st.integers(0, 5))] + shape[dim + 1 :]
        shapes.append(tuple(shape))
    placements = [draw(placements_for(len(s), len(mesh_shape), partial=True)) for s in shapes]
    return mesh_shape, shapes, placements, name, dim, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_cat_and_stack(world_size, data):
    run_on_ranks(world_size, _check_join, *data.draw(join_cases(world_size)))


def _check_index_select(mesh_shape, shape, placements, dim, index, index_placements, source_placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(_whole(seed, shape), mesh, placements, requires_grad=True)
    i = make_dtensor(torch.tensor(index, dtype=torch.long), mesh, index_placements)
    _check(lambda t, j: t.index_select(dim, j), x, i)
    source_shape = shape[:dim] + (len(index),) + shape[dim + 1 :]
    source = make_dtensor(_whole(seed + 1, source_shape), mesh, source_placements, requires_grad=True)
    _check(lambda t, j, src: t.index_add(dim, j, src, alpha=2.0), x, i, source)


@st.composite
def index_select_cases(draw, world_size):
    mesh_shape = draw(mesh_shapes(world_size))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    dim = draw(st.integers(0, len(shape) - 1))
    index = draw(st.lists(st.integers(0, shape[dim] - 1), max_size=6))
    layout = lambda ndim: placements_for(ndim, len(mesh_shape), partial=True)
    return (mesh_shape, shape, draw(layout(len(shape))), dim, index, draw(placements_for(1, len(mesh_shape))),
            draw(layout(len(shape))), draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=EXAMPLES // 2)
@given(data=st.data())
def test_index_select_and_index_add(world_size, data):
    run_on_ranks(world_size, _check_index_select, *data.draw(index_select_cases(world_size)))


# ---------------------------------------------------------------- what moves: collective counts


def _moved(fn, *args):
    """fn(*args) under comm_mode: (result, bytes sent, number of collectives, fallbacks)."""
    with comm_mode() as comm:
        out = fn(*args)
    return out, comm.bytes(), comm.count(), dict(comm.fallbacks)


def _even_views_move_nothing():
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    B, T, H, Dh = 4, 6, 4, 3
    x = make_dtensor(_whole(0, (B, T, H * Dh)), mesh, [Shard(0), Shard(2)], requires_grad=True)

    def heads(t):  # (B, T, H*Dh) -> (B, H, T, Dh) -> (B, T, H*Dh) -> (B*T, H*Dh), as attention does
        q = t.view(B, T, H, Dh).transpose(1, 2)
        q = q.movedim(1, 2).unflatten(3, (Dh, 1)).squeeze(-1).transpose(1, 2).transpose(1, 2)
        return q.reshape(B, T, H * Dh).flatten(0, 1)

    y, sent, calls, fallbacks = _moved(heads, x)
    assert (sent, calls, fallbacks) == (0, 0, {}), (sent, calls, fallbacks)
    assert y.placements == (Shard(0), Shard(1))
    grad = make_dtensor(_whole(1, (B * T, H * Dh)), mesh, y.placements)
    _, sent, calls, fallbacks = _moved(lambda: y.backward(grad))
    assert (sent, calls, fallbacks) == (0, 0, {}), (sent, calls, fallbacks)
    assert x.grad.placements == (Shard(0), Shard(2))
    torch.testing.assert_close(x.grad.full_tensor(), _whole(1, (B * T, H * Dh)).view(B, T, H * Dh))


def _unaligned_view_gathers_one_mesh_dim():
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    x = make_dtensor(_whole(0, (3, 4, 6)), mesh, [Shard(0), Shard(2)])
    with comm_mode() as comm:
        y = x.view(12, 2, 3)
    assert comm.count("all_gather", "dp") == 1 and comm.count() == 1 and not comm.fallbacks, comm
    assert y.placements == (R, Shard(1))
    torch.testing.assert_close(y.full_tensor(), _whole(0, (3, 4, 6)).view(12, 2, 3))


def test_counts_of_views():
    run_on_ranks(4, _even_views_move_nothing)
    run_on_ranks(4, _unaligned_view_gathers_one_mesh_dim)


def _layout_ops_move_nothing():
    mesh = dtp.init_device_mesh("cpu", (2,))
    x = make_dtensor(_whole(0, (4, 8, 6)), mesh, [Shard(0)])
    s = make_dtensor(_whole(1, (4, 8, 6)), mesh, [Shard(1)])
    r = make_dtensor(_whole(2, (4, 8, 6)), mesh, [R])
    index = make_dtensor(torch.tensor([5, 0, 3, 3]), mesh, [Shard(0)])
    cases = [
        (lambda: torch.cat([x, x * 1], 2), (Shard(0),)),
        (lambda: torch.stack([x, x], 0), (Shard(1),)),
        (lambda: x.split([2, 4], 2), (Shard(0),)),
        (lambda: s[:, :-1], (Shard(1),)),  # each rank's part of the slice is its block of the result
        (lambda: s[:, 1], (Partial(),)),  # the owner's row, zeros elsewhere
        (lambda: r.index_select(1, index), (Shard(1),)),  # a sharded index shards the output
        (lambda: x.permute(2, 0, 1).unsqueeze(0).squeeze(0), (Shard(1),)),
        (lambda: x[:, :1].expand(4, 5, 6).repeat(1, 1, 2), (Shard(0),)),
        (lambda: x.view(torch.int32), (Shard(0),)),
        (lambda: x.view(torch.float16), (Shard(0),)),
        (lambda: s.transpose(1, 2).contiguous().view(torch.float16), (Shard(2),)),  # 4 B x (4, 4) == 2 B x (8, 8)
    ]
    for i, (fn, placements) in enumerate(cases):
        out, sent, calls, fallbacks = _moved(fn)
        out = out if isinstance(out, tuple) else (out,)
        assert (sent, calls, fallbacks) == (0, 0, {}), (i, sent, calls, fallbacks)
        assert all(o.placements == placements for o in out), (i, [o.placements for o in out])
    src = make_dtensor(_whole(3, (4, 4, 6)), mesh, [Shard(1)])
    out, sent, calls, _ = _moved(lambda: r.index_add(1, index, src))  # each rank adds its rows: Partial(sum)
    assert (sent, calls, out.placements) == (0, 0, (Partial(),))
    expected = _whole(2, (4, 8, 6)).index_add(1, index.full_tensor(), _whole(3, (4, 4, 6)))
    torch.testing.assert_close(out.full_tensor(), expected)
    whole = _whole(1, (4, 8, 6))
    halves = s.transpose(1, 2).contiguous().view(torch.float16)
    assert torch.equal(halves.full_tensor().view(torch.int16), whole.transpose(1, 2).contiguous().view(torch.int16))
    for fn, grad_placements in ((lambda t: t[:, :-1], [Shard(1)]), (lambda t: t[:, 1], [R])):
        leaf = s.detach().requires_grad_(True)
        y = fn(leaf)
        grad = make_dtensor(torch.ones(y.shape), mesh, grad_placements)
        _, sent, calls, fallbacks = _moved(lambda: y.backward(grad))  # slice_backward, select_backward: local
        assert (sent, calls, fallbacks) == (0, 0, {}), (sent, calls, fallbacks)
        w = whole.clone().requires_grad_()
        torch.testing.assert_close(leaf.grad.full_tensor(), torch.autograd.grad(fn(w), w, torch.ones(y.shape))[0])
    torch.testing.assert_close(s[:, 1].full_tensor(), whole[:, 1])
    torch.testing.assert_close(s[:, :-1].full_tensor(), whole[:, :-1])
    _, sent, calls, _ = _moved(lambda: s[:, 1:])  # not aligned: gathers, exactly once
    assert calls == 1 and sent > 0


def test_counts_of_layout_ops():
    run_on_ranks(2, _layout_ops_move_nothing)


def _uneven_squeeze_takes_one_path():
    """Over 3 ranks a dim of 4 has blocks 2, 1, 1: local size-1 blocks must not be squeezed away, and the
    ranks must agree on every collective (a sharded size-1 dim, blocks 1, 0, 0, is gathered by all)."""
    mesh = dtp.init_device_mesh("cpu", (3,))
    x = make_dtensor(_whole(0, (4, 1, 1)), mesh, [Shard(0)], requires_grad=True)
    for fn in (lambda t: t.squeeze(), lambda t: torch.squeeze_copy(t, 2), lambda t: t.squeeze((0, 1))):
        assert_spmd_equal(fn, x)
    x = make_dtensor(_whole(0, (1, 5)), mesh, [Shard(0)], requires_grad=True)
    y, _, calls, _ = _moved(lambda t: t.squeeze(0), x)
    assert calls == 1 and y.placements == (R,)
    assert_spmd_equal(lambda t: torch.squeeze_copy(t), x)
    return tuple(y._local_tensor.shape)


def test_uneven_squeeze():
    assert run_on_ranks(3, _uneven_squeeze_takes_one_path) == [(5,)] * 3

"""Shape-op rules (ops/shape_ops.py, padding.py, diagonals.py, scatter_views.py, complex_views.py): decisions as
pure metadata, then outputs and gradients against one device on real gloo ranks (1-D meshes of 2, 3, 4 and a
2x2 mesh; even, uneven and empty shards; Partial inputs), and the collective counts of layouts that must move
nothing."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard, comm_mode
from dtensor_plus.ops.padding import pad_aligns
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.rules import decide
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for

aten = torch.ops.aten
R = Replicate()
WORLD_SIZES = (2, 3, 4)
EXAMPLES = 12  # per world size and property

# ---------------------------------------------------------------- decisions as pure metadata


def _decide(func, shape, placements, *args, mesh_shape=(4,)):
    inputs, outputs = decide(func, (shape, tuple(placements)), *args, mesh_shape=mesh_shape)
    return inputs[0], outputs[0]


def test_pad_aligns():
    assert pad_aligns(8, 1, 1, [2])  # blocks (0,4),(4,4) -> (0,5),(5,5): each keeps its own rows
    assert pad_aligns(8, 0, 0, [3])
    assert not pad_aligns(8, 0, 2, [2])  # (0,5) would need row 4 of rank 1
    assert not pad_aligns(8, 2, 0, [2])
    assert pad_aligns(8, -1, -1, [2])  # crops
    assert not pad_aligns(6, 1, 1, [2, 2])  # nested: (2, 1) -> (2, 2) at coordinate (0, 1) needs row 1
    assert pad_aligns(2, 0, 1, [4])  # 1,1,0,0 -> 1,1,1,0: the third rank holds only pad


def test_rule_decisions():
    s0, s1, s2 = Shard(0), Shard(1), Shard(2)
    # tril of a matrix sharded on rows or columns: no move (the diagonal is shifted per rank)
    assert _decide(aten.tril.default, (5, 7), (s0,), 1) == ((s0,), (s0,))
    assert _decide(aten.triu.default, (5, 7), (s1,)) == ((s1,), (s1,))
    # flip/roll gather only the mesh dims sharding a moved dim
    assert _decide(aten.flip.default, (4, 6, 8), (s0, s2), [2], mesh_shape=(2, 2)) == ((s0, R), (s0, R))
    assert _decide(aten.roll.default, (4, 6), (s1,), [1], [0]) == ((s1,), (s1,))
    assert _decide(aten.roll.default, (4, 6), (s1,), [1]) == ((R,), (R,))  # no dims: a flat roll
    assert _decide(aten.rot90.default, (4, 6), (s0,), 1, [0, 1]) == ((s0,), (s1,))
    # diagonal: batch dims renumbered, matrix dims gathered; Partial passes
    assert _decide(aten.diagonal.default, (3, 4, 5), (s1, Partial()), 0, 0, 2, mesh_shape=(2, 2)) == (
        (s1, Partial()), (s0, Partial()))
    # ... a sharded matrix dim gives a Partial(sum) of the diagonal (zeros outside each block), unless the
    # input is Partial already
    assert _decide(aten.diagonal.default, (3, 4, 5), (s2,), 0, 0, 2) == ((s2,), (Partial(),))
    assert _decide(aten.diagonal.default, (3, 4, 5), (s2, Partial()), 0, 0, 2, mesh_shape=(2, 2)) == (
        (R, Partial()), (R, Partial()))
    assert _decide(aten.diag_embed.default, (3, 4), (s0,), 0, 0, 2) == ((s0,), (s1,))
    # view_as_complex: the (re, im) dim is gathered; max/min partials are reduced
    assert _decide(aten.view_as_complex.default, (3, 2), (s1,)) == ((R,), (R,))
    assert _decide(aten.view_as_complex.default, (3, 2), (Partial("max"),)) == ((R,), (R,))
    assert _decide(aten.view_as_real.default, (3, 4), (s1,)) == ((s1,), (s1,))
    # pads: a symmetric pad of an even split stays; a one-sided one gathers that mesh dim only
    assert _decide(aten.constant_pad_nd.default, (3, 8), (s1,), [1, 1], mesh_shape=(2,)) == ((s1,), (s1,))
    assert _decide(aten.constant_pad_nd.default, (4, 8), (s0, s1), [0, 2], mesh_shape=(2, 2)) == ((s0, R), (s0, R))


# ---------------------------------------------------------------- ops on ranks, against one device


def _whole(seed, shape, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _pad(t, a):
    return F.pad(t, a[0], value=a[1])


_OPS = {  # name -> fn(t, args) or, with a second tensor, fn(t, src, args)
    "tril": lambda t, a: t.tril(*a),
    "triu": lambda t, a: t.triu(*a),
    "tril_": lambda t, a: (t * 1).tril_(*a),
    "flip": lambda t, a: t.flip(a),
    "rot90": lambda t, a: t.rot90(*a),
    "roll": lambda t, a: t.roll(*a),
    "unfold": lambda t, a: t.unfold(*a),
    "pad": _pad,
    "diagonal": lambda t, a: t.diagonal(*a),
    "diag_embed": lambda t, a: torch.diag_embed(t, *a),
    "view_as_complex": lambda t, a: torch.view_as_real(torch.view_as_complex(t) * (1 - 2j)),
}
_TWO_INPUTS = {  # the ops with a second tensor input
    "complex": lambda t, s, a: torch.view_as_real(torch.complex(t, s)),
    "diagonal_scatter": lambda t, s, a: torch.diagonal_scatter(t, s, *a),
    "select_scatter": lambda t, s, a: torch.select_scatter(t, s, *a),
    "slice_scatter": lambda t, s, a: torch.slice_scatter(t, s, *a),
}


def _check(fn, *args):
    """No fallback in the forward, then outputs and gradients against one device."""
    with comm_mode() as comm:
        fn(*args)
    assert not comm.fallbacks, comm.fallbacks
    assert_spmd_equal(fn, *args)


def _check_op(mesh_shape, shape, placements, name, args, seed, src_shape=None, src_placements=None):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(_whole(seed, shape), mesh, placements, requires_grad=True)
    if name in _TWO_INPUTS:
        src = make_dtensor(_whole(seed + 1, src_shape), mesh, src_placements, requires_grad=True)
        _check(lambda t, s: _TWO_INPUTS[name](t, s, args), x, src)
    else:
        _check(lambda t: _OPS[name](t, args), x)


def _check_view_as_real(mesh_shape, shape, placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(_whole(seed, shape, torch.complex64), mesh, placements, requires_grad=True)
    _check(lambda t: torch.view_as_real(t) * 2, x)


_SIZES = [0, 1, 2, 3, 4, 5, 6]


@st.composite
def _args(draw, shape):
    """(name, args, src shape or None) of one op valid for ``shape``."""
    ndim = len(shape)
    dim = st.integers(-ndim, ndim - 1)
    names = ["flip", "roll", "unfold", "pad", "diag_embed", "select_scatter", "slice_scatter", "complex"]
    names += ["tril", "triu", "tril_", "rot90", "diagonal", "diagonal_scatter"] if ndim >= 2 else []
    # (no empty ones: the full_tensor() of an empty DTensor may have strides torch's view_as_complex refuses)
    names += ["view_as_complex"] if shape[-1] == 2 and 0 not in shape else []
    name = draw(st.sampled_from(names))
    meta = torch.empty(shape, device="meta")
    if name in ("tril", "triu", "tril_"):
        return name, (draw(st.integers(-3, 3)),), None
    if name == "flip":
        return name, tuple(draw(st.sets(st.integers(0, ndim - 1), max_size=ndim))), None
    if name == "rot90":
        return name, (draw(st.integers(-2, 5)), draw(st.permutations(range(ndim)))[:2]), None
    if name == "roll":
        dims = draw(st.lists(dim, max_size=ndim, unique_by=lambda d: d % ndim))
        shifts = [draw(st.integers(-7, 7)) for _ in dims or [0]]
        return name, (shifts, dims), None
    if name == "unfold":
        d = draw(dim)
        return name, (d, draw(st.integers(0 if shape[d] == 0 else 1, shape[d])), draw(st.integers(1, 3))), None
    if name == "pad":
        pads = []
        for size in reversed(shape[ndim - draw(st.integers(1, ndim)):]):
            pads += [draw(st.integers(-(size // 2), 3)), draw(st.integers(-(size // 2), 3))]
        return name, (pads, draw(st.sampled_from([0.0, 1.5, -2]))), None
    if name in ("diagonal", "diag_embed", "diagonal_scatter"):
        offset = draw(st.integers(-3, 3))
        dims = draw(st.permutations(range(ndim + (name == "diag_embed"))))[:2]
        args = (offset, *dims)
        return name, args, tuple(meta.diagonal(*args).shape) if name == "diagonal_scatter" else None
    if name == "view_as_complex":
        return name, (), None
    if name == "complex":
        return name, (), shape
    d = draw(st.integers(0, ndim - 1))
    if name == "select_scatter":
        if shape[d] == 0:
            return "flip", (d,), None
        index = draw(st.integers(-shape[d], shape[d] - 1))
        return name, (d, index), tuple(meta.select(d, index).shape)
    start, end = draw(st.integers(-7, 7)), draw(st.integers(-7, 7))
    step = draw(st.integers(1, 3))
    args = (d, start, end, step)
    return name, args, tuple(meta[(slice(None),) * d + (slice(start, end, step),)].shape)


@st.composite
def _cases(draw, world_size):
    mesh_shape = draw(mesh_shapes(world_size))
    shape = tuple(draw(st.lists(st.sampled_from(_SIZES), min_size=1, max_size=3)))
    if draw(st.booleans()):
        shape += (2,)  # a (re, im) dim for view_as_complex
    placements = draw(placements_for(len(shape), len(mesh_shape), partial=True))
    name, args, src_shape = draw(_args(shape))
    src_placements = None
    if src_shape is not None:
        src_placements = draw(placements_for(len(src_shape), len(mesh_shape), partial=True))
    return mesh_shape, shape, placements, name, args, draw(st.integers(0, 2**16)), src_shape, src_placements


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_shape_ops(world_size, data):
    run_on_ranks(world_size, _check_op, *data.draw(_cases(world_size)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=EXAMPLES // 3)
@given(data=st.data())
def test_view_as_real(world_size, data):
    mesh_shape = data.draw(mesh_shapes(world_size))
    shape = tuple(data.draw(st.lists(st.sampled_from(_SIZES), min_size=1, max_size=3)))
    placements = data.draw(placements_for(len(shape), len(mesh_shape), partial=False))
    if data.draw(st.booleans()):  # Partial(sum) on the first mesh dim (max/min of complex mean nothing)
        placements = (Partial(),) + placements[1:]
    run_on_ranks(world_size, _check_view_as_real, mesh_shape, shape, placements, data.draw(st.integers(0, 2**16)))


# ---------------------------------------------------------------- what moves: nothing, where the rule says so


def _moves_nothing():
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    whole = _whole(0, (4, 6, 8))
    s01, s12, s22 = [Shard(0), Shard(1)], [Shard(1), Shard(2)], [Shard(2), Shard(2)]
    src_select = make_dtensor(whole[:, 2] * 2, mesh, [R, Shard(1)])  # self's dim 2 is src's dim 1
    src_slice = make_dtensor(whole[:, 1:5:2] * 2, mesh, [R, Shard(2)])
    local = [  # (layout of x, fn) for fns of x alone
        (s12, lambda t: t.tril(1)),  # both matrix dims sharded: the diagonal shifts per rank
        (s12, lambda t: t.triu(-2)),
        (s12, lambda t: t.flip(0)),
        (s12, lambda t: t.roll(3, 0)),
        (s12, lambda t: F.pad(t, (1, 1, 1, 1), value=2.0)),  # symmetric pads of even splits
        (s22, lambda t: t.diagonal(0, 1, 0)),
        (s01, lambda t: torch.diag_embed(t, 1, 0, 2)),  # the embedded (last) dim whole
        (s12, lambda t: torch.view_as_real(torch.view_as_complex(t.view(4, 6, 4, 2)))),
    ]
    cases = [(p, fn, fn(whole)) for p, fn in local] + [  # (layout of x, fn, expected): every one runs
        (s12, lambda t: torch.select_scatter(t, src_select, 1, 2),  # forward and backward with no collective
         torch.select_scatter(whole, whole[:, 2] * 2, 1, 2)),
        (s12, lambda t: torch.slice_scatter(t, src_slice, 1, 1, 5, 2),
         torch.slice_scatter(whole, whole[:, 1:5:2] * 2, 1, 1, 5, 2)),
    ]
    for i, (placements, fn, expected) in enumerate(cases):
        x = make_dtensor(whole, mesh, placements, requires_grad=True)
        with comm_mode() as comm:
            y = fn(x)
        assert (comm.count(), dict(comm.fallbacks)) == (0, {}), (i, comm)
        torch.testing.assert_close(y.full_tensor(), expected, msg=lambda m: f"case {i}: {m}")
        grad = make_dtensor(_whole(1, tuple(y.shape)), mesh, y.placements)
        with comm_mode() as comm:
            y.backward(grad)
        assert (comm.count(), dict(comm.fallbacks)) == (0, {}), (i, "backward", comm)


def _gathers_one_mesh_dim():
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    whole = _whole(0, (4, 5, 7))  # uneven on both sharded dims
    x = make_dtensor(whole, mesh, [Shard(0), Shard(2)])
    for fn in (lambda t: t.flip(2), lambda t: t.roll(1, 2), lambda t: F.pad(t, (0, 3))):
        with comm_mode() as comm:
            y = fn(x)
        assert comm.count("all_gather", "tp") == 1 and comm.count() == 1 and not comm.fallbacks, comm
        assert y.placements[0] == Shard(0)
        torch.testing.assert_close(y.full_tensor(), fn(whole))
    # Uneven blocks that still move nothing: a shifted diagonal per rank; a right pad that only the last
    # block takes (7 -> 8 over 2: blocks 4, 3 -> 4, 4)
    for fn in (lambda t: t.tril(2), lambda t: t.triu(-1), lambda t: F.pad(t, (0, 1))):
        with comm_mode() as comm:
            y = fn(x)
        assert comm.count() == 0 and not comm.fallbacks and y.placements == (Shard(0), Shard(2)), comm
        torch.testing.assert_close(y.full_tensor(), fn(whole))
    for offset in (-2, 0, 3):  # the diagonal of a column-sharded matrix: each rank's part, zeros elsewhere
        with comm_mode() as comm:
            y = x.diagonal(offset, 1, 2)
        assert comm.count() == 0 and not comm.fallbacks and y.placements == (Shard(0), Partial()), comm
        torch.testing.assert_close(y.full_tensor(), whole.diagonal(offset, 1, 2))


def _partial_pad_carries_value_once():
    mesh = dtp.init_device_mesh("cpu", (3,))
    whole = _whole(0, (4, 5))
    x = make_dtensor(whole, mesh, [Partial()])
    with comm_mode() as comm:
        y = F.pad(x, (2, 1), value=1.25)
    assert comm.count() == 0 and y.placements == (Partial(),), (comm, y.placements)
    torch.testing.assert_close(y.full_tensor(), F.pad(whole, (2, 1), value=1.25))


def test_counts():
    run_on_ranks(4, _moves_nothing)
    run_on_ranks(4, _gathers_one_mesh_dim)
    run_on_ranks(3, _partial_pad_carries_value_once)


# ---------------------------------------------------------------- tensor_split with its points in a tensor


def _tensor_split_points(mesh_shape, shape, placements, dim, points, seed):
    """torch.tensor_split(x, points, dim) with the points a plain CPU int64 tensor (what torch asks for): a 1-d
    tensor of indices or a 0-d count of sections."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(_whole(seed, shape), mesh, placements, requires_grad=True)
    _check(lambda t: torch.tensor_split(t, torch.tensor(points, dtype=torch.int64), dim), x)


@st.composite
def tensor_split_cases(draw, world_size):
    mesh_shape = draw(mesh_shapes(world_size))
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 7), min_size=ndim, max_size=ndim)))
    placements = draw(placements_for(ndim, len(mesh_shape), partial=True))
    dim = draw(st.integers(-ndim, ndim - 1))
    points = draw(st.integers(1, 4) | st.lists(st.integers(-2, 9), min_size=1, max_size=4))  # sections or indices
    return mesh_shape, shape, placements, dim, points, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("world_size", (2, 4))
@settings(max_examples=15)
@given(data=st.data())
def test_tensor_split_with_tensor_points(world_size, data):
    run_on_ranks(world_size, _tensor_split_points, *data.draw(tensor_split_cases(world_size)))

"""Gather / scatter rules (ops/indexing.py): the single-device oracle (outputs and gradients) over hypothesis
layouts of self, index and src on meshes of 2, 3, 4 and 2x2 ranks, uneven and empty shards included; and no
collective where the rule promises none."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for

WORLD_SIZES = [2, 3, 4]
KINDS = ["gather", "scatter", "scatter_value", "scatter_add", "scatter_reduce", "index_copy", "index_fill",
         "index_reduce"]


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _index(shape, high, seed):
    if not high:
        return torch.zeros(shape, dtype=torch.long)
    return torch.randint(0, high, shape, generator=_generator(seed))


def _call(kind, dim, reduce, include_self):
    """The op under test as a function of (self, index, src) DTensors or tensors."""
    calls = {
        "gather": lambda s, i, src: torch.gather(s, dim, i),
        "scatter": lambda s, i, src: torch.scatter(s, dim, i, src),
        "scatter_value": lambda s, i, src: torch.scatter(s, dim, i, 1.5),
        "scatter_add": lambda s, i, src: torch.scatter_add(s, dim, i, src),
        "scatter_reduce": lambda s, i, src: torch.scatter_reduce(s, dim, i, src, reduce, include_self=include_self),
        "index_copy": lambda s, i, src: torch.index_copy(s, dim, i, src),
        "index_fill": lambda s, i, src: torch.index_fill(s, dim, i, -2.0),
        "index_reduce": lambda s, i, src: torch.index_reduce(s, dim, i, src, "mean" if reduce == "sum" else reduce,
                                                             include_self=include_self),
    }
    return calls[kind]


def check_indexing(kind, mesh_shape, self_shape, dim, index_shape, src_shape, placements, reduce, include_self, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = torch.randn(self_shape, generator=_generator(seed), dtype=torch.float64)
    whole_src = torch.randn(src_shape, generator=_generator(seed + 1), dtype=torch.float64)
    if kind in ("index_copy", "index_fill", "index_reduce"):  # distinct rows: a repeated index_copy row is
        # order-dependent
        whole_index = torch.randperm(self_shape[dim], generator=_generator(seed + 2))[: index_shape[0]]
    else:
        whole_index = _index(index_shape, self_shape[dim], seed + 2)
    x = make_dtensor(whole, mesh, placements[0], requires_grad=True)
    index = make_dtensor(whole_index, mesh, placements[1])
    src = make_dtensor(whole_src, mesh, placements[2], requires_grad=True)
    # torch's own backward refuses a src larger than the index (its grad has the index's shape): forward only
    backward = whole_src.shape == whole_index.shape or kind in ("gather", "scatter_value", "index_fill")
    assert_spmd_equal(_call(kind, dim, reduce, include_self), x, index, src, backward=backward)


@st.composite
def _case(draw, world_size, kind):
    mesh_shape = draw(mesh_shapes(world_size))
    ndim = draw(st.integers(1, 3))
    self_shape = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
    dim = draw(st.integers(0, ndim - 1))
    if kind in ("index_copy", "index_fill", "index_reduce"):
        index_shape = (draw(st.integers(0, self_shape[dim])),)
        src_shape = self_shape[:dim] + index_shape + self_shape[dim + 1:]
    else:
        # index no larger than self off dim (and than src); the rule narrows a shorter index to each block
        index_shape = tuple(draw(st.integers(0, n)) if d != dim else draw(st.integers(0, 4))
                            for d, n in enumerate(self_shape))
        if kind != "gather" and self_shape[dim] == 0:
            index_shape = tuple(0 if d == dim else n for d, n in enumerate(index_shape))
        src_shape = tuple(n + draw(st.integers(0, 1)) for n in index_shape)
    if kind == "gather" and self_shape[dim] == 0:
        index_shape = tuple(0 if d == dim else n for d, n in enumerate(index_shape))
    mesh_ndim = len(mesh_shape)
    self_p = draw(placements_for(ndim, mesh_ndim, partial=True))
    index_p = draw(placements_for(len(index_shape), mesh_ndim))
    src_p = draw(placements_for(len(src_shape), mesh_ndim, partial=True))
    reduce = draw(st.sampled_from(["sum", "prod", "mean", "amax", "amin"]))
    return (kind, mesh_shape, self_shape, dim, index_shape, src_shape, (self_p, index_p, src_p), reduce,
            draw(st.booleans()), draw(st.integers(0, 999)))


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=12)
@given(data=st.data())
def test_indexing_matches_single_device(kind, data):
    world_size = data.draw(st.sampled_from(WORLD_SIZES))
    run_on_ranks(world_size, check_indexing, *data.draw(_case(world_size, kind)))


# -- an index shorter than self along a sharded dim: the whole tensor is narrowed to the block's rows -----


def check_narrowed_rows(mesh_shape):
    """gather with an index of 4 rows sharded over self's 7 (self whole, cut to each index block's rows), and
    scatter_add into 7 sharded rows from an index and src of 4 and 5 rows (cut to each self block's rows)."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    shard = [Shard(0)] * len(mesh_shape)  # nested on a 2-d mesh: blocks of blocks
    r = [Replicate()] * len(mesh_shape)
    whole = torch.randn(7, 3, generator=_generator(3), dtype=torch.float64)
    index = _index((4, 2), 3, 4)
    src = torch.randn(5, 2, generator=_generator(5), dtype=torch.float64)
    x = make_dtensor(whole, mesh, r, requires_grad=True)
    assert_spmd_equal(lambda t, i: torch.gather(t, 1, i), x, make_dtensor(index, mesh, shard))
    x = make_dtensor(whole, mesh, shard, requires_grad=True)
    out = assert_spmd_equal(lambda t, i, u: torch.scatter_add(t, 1, i, u), x, make_dtensor(index, mesh, r),
                            make_dtensor(src, mesh, r), backward=False)
    assert out.placements == tuple(shard)


@pytest.mark.parametrize("mesh_shape", [(3,), (4,), (2, 2)])
def test_shorter_index_is_narrowed(mesh_shape):
    run_on_ranks(int(torch.tensor(mesh_shape).prod()), check_narrowed_rows, mesh_shape)


# -- no collectives where the index rows and the shards line up ----------------------------------------


def check_local(mesh_shape):
    """self and src sharded along a dim other than ``dim``, index replicated: sliced for free, no collective,
    forward and backward; Partial(sum) self and src pass through scatter_add; gather from a self sharded
    along ``dim`` (nested on a 2-d mesh) is a masked local gather, Partial(sum)."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    placements = [Shard(0), Shard(1)][: len(mesh_shape)]
    r = [Replicate()] * len(mesh_shape)
    whole = torch.randn(5, 3, 4, generator=_generator(0), dtype=torch.float64)
    x = make_dtensor(whole, mesh, placements, requires_grad=True)
    index = make_dtensor(_index((5, 3, 2), 4, 1), mesh, r)
    grad = make_dtensor(torch.randn(5, 3, 4, generator=_generator(2), dtype=torch.float64), mesh, placements)
    with dtp.comm_mode() as comm:
        y = torch.gather(x, 2, index)
        z = torch.scatter_add(x, 2, index, y * 2)
        z.backward(grad)
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert y.placements == z.placements == x.grad.placements == tuple(placements)
    full = whole.clone().requires_grad_(True)
    w = torch.gather(full, 2, index.full_tensor())
    want = torch.scatter_add(full, 2, index.full_tensor(), w * 2)
    want.backward(grad.full_tensor())
    torch.testing.assert_close(z.full_tensor(), want)
    torch.testing.assert_close(x.grad.full_tensor(), full.grad)
    partial = [Partial()] * len(mesh_shape)
    a, b = make_dtensor(whole, mesh, partial), make_dtensor(whole * 3, mesh, partial)
    with dtp.comm_mode() as comm:
        c = torch.scatter_add(a, 2, index, torch.gather(b, 2, index))
    assert comm.count() == 0 and c.placements == tuple(partial), (comm, c.placements)
    torch.testing.assert_close(c.full_tensor(), torch.scatter_add(whole, 2, index.full_tensor(),
                                                                  torch.gather(whole * 3, 2, index.full_tensor())))
    v = make_dtensor(whole, mesh, [Shard(2)] * len(mesh_shape))
    with dtp.comm_mode() as comm:
        picked = torch.gather(v, 2, index)
    assert comm.count() == 0 and picked.placements == tuple(partial), (comm, picked.placements)
    torch.testing.assert_close(picked.full_tensor(), torch.gather(whole, 2, index.full_tensor()))


@pytest.mark.parametrize("mesh_shape", [(3,), (2, 2)])
def test_aligned_layouts_need_no_collective(mesh_shape):
    run_on_ranks(int(torch.tensor(mesh_shape).prod()), check_local, mesh_shape)

"""_unsafe_masked_index / _unsafe_masked_index_put_accumulate (ops/masked_index.py) and masked_scatter /
masked_scatter_backward (ops/masked_scatter.py): the single-device oracle (outputs and gradients) over
hypothesis layouts of every tensor input on meshes of 2, 3, 4 and 2x2 ranks, uneven and empty shards, clamped and
negative indices, leading and trailing dims no index touches, broadcast masks; never the fallback; and no
collective where the rules promise none."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for

aten = torch.ops.aten


def _generator(seed):
    return torch.Generator().manual_seed(seed)


# -- _unsafe_masked_index and its put_accumulate ------------------------------------------------------------


def _masked_index_inputs(self_shape, first, b_shape, seed):
    """Indices for dims first .. first + len(b_shape) - 1 of self (None before: untouched leading dims), shaped
    to broadcast to ``b_shape``, with values past both ends (clamped by the op); a mask of the result's shape
    or broadcast along its first dim."""
    g = _generator(seed)
    ndim_b = len(b_shape)
    indices = [None] * first
    for k in range(ndim_b):
        size = self_shape[first + k]
        shape = [1] * ndim_b
        shape[k] = b_shape[k]
        indices.append(torch.randint(-size - 2, size + 2, shape, generator=g))
    out_shape = self_shape[:first] + b_shape + self_shape[first + ndim_b:]
    mask_shape = out_shape if torch.rand((), generator=g) < 0.5 else (1,) + out_shape[1:]
    mask = torch.rand(mask_shape, generator=g) < 0.7
    return indices, mask, out_shape


def check_masked_index(mesh_shape, self_shape, first, b_shape, placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    self_p, mask_p, index_p, values_p = placements
    whole = torch.randn(self_shape, generator=_generator(seed), dtype=torch.float64)
    indices, mask, out_shape = _masked_index_inputs(self_shape, first, b_shape, seed + 1)
    values = torch.randn(out_shape, generator=_generator(seed + 2), dtype=torch.float64)
    x = make_dtensor(whole, mesh, self_p, requires_grad=True)
    m = make_dtensor(mask, mesh, mask_p if mask.shape == out_shape else [Replicate()] * len(mesh_shape))
    dist_indices = [None if t is None else make_dtensor(t, mesh, index_p if t.shape[0] > 1 else [Replicate()] *
                                                        len(mesh_shape)) for t in indices]
    v = make_dtensor(values, mesh, values_p, requires_grad=True)
    with dtp.comm_mode() as comm:
        assert_spmd_equal(lambda t, k, *idx: aten._unsafe_masked_index(t, k, list(idx), -1.5), x, m, *dist_indices)
        assert_spmd_equal(lambda t, k, u, *idx: aten._unsafe_masked_index_put_accumulate(t, k, list(idx), u),
                          x, m, v, *dist_indices)
    assert not comm.fallbacks, comm.fallbacks


@st.composite
def _masked_index_case(draw, world_size):
    mesh_shape = draw(mesh_shapes(world_size))
    self_shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    first = draw(st.integers(0, len(self_shape) - 1))
    num_indexed = draw(st.integers(1, len(self_shape) - first))
    b_shape = tuple(draw(st.lists(st.integers(0, 4), min_size=num_indexed, max_size=num_indexed)))
    out_ndim = len(self_shape) - num_indexed + len(b_shape)
    mesh_ndim = len(mesh_shape)
    placements = (draw(placements_for(len(self_shape), mesh_ndim, partial=True)),
                  draw(placements_for(out_ndim, mesh_ndim)), draw(placements_for(len(b_shape), mesh_ndim)),
                  draw(placements_for(out_ndim, mesh_ndim, partial=True)))
    return mesh_shape, self_shape, first, b_shape, placements, draw(st.integers(0, 999))


@settings(max_examples=16)
@given(data=st.data())
def test_masked_index_matches_single_device(data):
    world_size = data.draw(st.sampled_from([2, 3, 4]))
    run_on_ranks(world_size, check_masked_index, *data.draw(_masked_index_case(world_size)))


# -- masked_scatter ----------------------------------------------------------------------------------------


def check_masked_scatter(mesh_shape, self_shape, mask_shape, placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    self_p, mask_p, source_p = placements
    whole = torch.randn(self_shape, generator=_generator(seed), dtype=torch.float64)
    mask = torch.rand(mask_shape, generator=_generator(seed + 1)) < 0.5
    out_shape = torch.broadcast_shapes(self_shape, mask_shape)
    source = torch.randn(out_shape.numel() + 1, generator=_generator(seed + 2), dtype=torch.float64)
    x = make_dtensor(whole, mesh, self_p, requires_grad=True)
    m = make_dtensor(mask, mesh, mask_p)
    s = make_dtensor(source, mesh, source_p, requires_grad=True)
    with dtp.comm_mode() as comm:
        assert_spmd_equal(lambda t, k, u: torch.masked_scatter(t, k, u), x, m, s)
        if tuple(self_shape) == tuple(out_shape):
            assert_spmd_equal(lambda t, k, u: t.clone().masked_scatter_(k, u), x, m, s, backward=False)
    assert not comm.fallbacks, comm.fallbacks


@st.composite
def _masked_scatter_case(draw, world_size):
    mesh_shape = draw(mesh_shapes(world_size))
    out_shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    self_shape = tuple(draw(st.sampled_from([n, 1])) for n in out_shape)[draw(st.integers(0, len(out_shape) - 1)):]
    mask_shape = tuple(draw(st.sampled_from([n, 1])) for n in out_shape)
    if torch.broadcast_shapes(self_shape, mask_shape) != out_shape:  # one of them spans the result
        mask_shape = out_shape
    mesh_ndim = len(mesh_shape)
    placements = (draw(placements_for(len(self_shape), mesh_ndim, partial=True)),
                  draw(placements_for(len(mask_shape), mesh_ndim)), draw(placements_for(1, mesh_ndim, partial=True)))
    return mesh_shape, self_shape, mask_shape, placements, draw(st.integers(0, 999))


@settings(max_examples=16)
@given(data=st.data())
def test_masked_scatter_matches_single_device(data):
    world_size = data.draw(st.sampled_from([2, 3, 4]))
    run_on_ranks(world_size, check_masked_scatter, *data.draw(_masked_scatter_case(world_size)))


# -- the layouts the rules promise, with no collective at all -------------------------------------------------


def check_local(mesh_shape):
    """A leading dim no index touches (interpolation's batch and channels) stays sharded in both masked-index
    ops; a self sharded along an indexed dim gives a Partial(sum) read and a sharded accumulate; masked_scatter
    keeps self's Shard beside a replicated mask and source, and its source gradient is Partial(sum)."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    ndim = len(mesh_shape)
    r, partial = [Replicate()] * ndim, [Partial()] * ndim
    lead, indexed = [Shard(0), Shard(1)][:ndim], [Shard(2)] * ndim
    whole = torch.randn(4, 3, 5, generator=_generator(0), dtype=torch.float64)
    index = torch.tensor([-7, 0, 2, 4, 9, 3])
    mask = index.ge(0) & index.lt(5)
    grad = torch.randn(4, 3, 6, generator=_generator(1), dtype=torch.float64)
    read = lambda t, k, j: aten._unsafe_masked_index(t, k, [None, None, j], 0.5)  # noqa: E731
    accumulate = lambda t, k, j, g: aten._unsafe_masked_index_put_accumulate(t, k, [None, None, j], g)  # noqa: E731
    for self_p, grad_p, read_p, accumulate_p in [(lead, lead, lead, lead), (indexed, r, partial, indexed)]:
        x, k, j = make_dtensor(whole, mesh, self_p), make_dtensor(mask, mesh, r), make_dtensor(index, mesh, r)
        g = make_dtensor(grad, mesh, grad_p)
        with dtp.comm_mode() as comm:
            y, z = read(x, k, j), accumulate(x, k, j, g)
        assert comm.count() == 0 and not comm.fallbacks, (comm, self_p)
        assert (y.placements, z.placements) == (tuple(read_p), tuple(accumulate_p))
        torch.testing.assert_close(y.full_tensor(), read(whole, mask, index))
        torch.testing.assert_close(z.full_tensor(), accumulate(whole, mask, index, grad))
    smask = torch.rand(4, 3, 5, generator=_generator(2)) < 0.5
    source = torch.randn(70, generator=_generator(3), dtype=torch.float64)
    x = make_dtensor(whole, mesh, lead, requires_grad=True)
    k, s = make_dtensor(smask, mesh, r), make_dtensor(source, mesh, r, requires_grad=True)
    with dtp.comm_mode() as comm:
        y = torch.masked_scatter(x, k, s)
        source_grad = aten.masked_scatter_backward(y, k, [70])
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert (y.placements, source_grad.placements) == (tuple(lead), tuple(partial))
    want = torch.masked_scatter(whole, smask, source)
    torch.testing.assert_close(y.full_tensor(), want)
    torch.testing.assert_close(source_grad.full_tensor(), aten.masked_scatter_backward(want, smask, [70]))


@pytest.mark.parametrize("mesh_shape", [(3,), (2, 2)])
def test_promised_layouts_need_no_collective(mesh_shape):
    run_on_ranks(int(torch.tensor(mesh_shape).prod()), check_local, mesh_shape)

"""take / put / put_ rules (ops/flat_indexing.py): the single-device oracle (outputs and gradients, whose
backward is put_ and take again) over hypothesis layouts of self, index and source on meshes of 2, 3, 4 and 2x2
ranks, uneven and empty shards, negative and repeated indices included, never the fallback; and no collective
where the rule promises none."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _flat_index(numel, shape, seed, unique):
    """Flat indices into ``numel`` elements, half of them negative (they wrap); ``unique``: no repeats."""
    if numel == 0:
        return torch.zeros(shape, dtype=torch.long)
    count = torch.Size(shape).numel()
    if unique:
        index = torch.randperm(numel, generator=_generator(seed))[:count].reshape(shape)
    else:
        index = torch.randint(0, numel, shape, generator=_generator(seed))
    flip = torch.rand(shape, generator=_generator(seed + 1)) < 0.5
    return torch.where(flip, index - numel, index)


def check_take_put(mesh_shape, self_shape, index_shape, placements, accumulate, unique, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    self_p, index_p, source_p = placements
    whole = torch.randn(self_shape, generator=_generator(seed), dtype=torch.float64)
    numel = whole.numel()
    index = _flat_index(numel, index_shape, seed + 2, unique)
    source = torch.randn(index_shape, generator=_generator(seed + 3), dtype=torch.float64)
    x = make_dtensor(whole, mesh, self_p, requires_grad=True)
    i = make_dtensor(index, mesh, index_p)
    s = make_dtensor(source, mesh, source_p, requires_grad=True)
    with dtp.comm_mode() as comm:
        assert_spmd_equal(lambda t, j: torch.take(t, j), x, i)
        assert_spmd_equal(lambda t, j, u: torch.put(t, j, u, accumulate=accumulate), x, i, s)
    assert not comm.fallbacks, comm.fallbacks


@st.composite
def _case(draw, world_size):
    mesh_shape = draw(mesh_shapes(world_size))
    self_shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    numel = torch.Size(self_shape).numel()
    unique = draw(st.booleans())
    index_shape = tuple(draw(st.lists(st.integers(0, 4 if numel else 0), min_size=1, max_size=2)))
    if unique and torch.Size(index_shape).numel() > numel:
        index_shape = (numel,)
    mesh_ndim = len(mesh_shape)
    placements = (draw(placements_for(len(self_shape), mesh_ndim, partial=True)),
                  draw(placements_for(len(index_shape), mesh_ndim)),
                  draw(placements_for(len(index_shape), mesh_ndim, partial=True)))
    return mesh_shape, self_shape, index_shape, placements, draw(st.booleans()), unique, draw(st.integers(0, 999))


@settings(max_examples=20)
@given(data=st.data())
def test_take_put_match_single_device(data):
    world_size = data.draw(st.sampled_from([2, 3, 4]))
    run_on_ranks(world_size, check_take_put, *data.draw(_case(world_size)))


# -- the layouts each rule promises, with no collective at all ------------------------------------------


def check_local(mesh_shape):
    """take: an index sharded over a replicated self stays sharded; a self sharded on any dims (nested on a 2-d
    mesh) with a replicated index gives Partial(sum). put: a sharded self writes its own entries in place (put_,
    repeated indices resolved as on one device), and an accumulating put of a sharded source into a
    replicated self gives Partial(sum)."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    ndim = len(mesh_shape)
    r, partial = [Replicate()] * ndim, [Partial()] * ndim
    whole = torch.randn(5, 4, generator=_generator(0), dtype=torch.float64)
    index = torch.tensor([[3, -1, 7, 3, 19], [0, 12, -20, 5, 3]])
    source = torch.randn(2, 5, generator=_generator(1), dtype=torch.float64)
    sharded = [Shard(0), Shard(1)][:ndim]
    checks = [
        (lambda t, j, u: torch.take(t, j), (r, sharded, r), sharded),
        (lambda t, j, u: torch.take(t, j), (sharded, r, r), partial),
        (lambda t, j, u: t.clone().put_(j, u), (sharded, r, r), sharded),
        (lambda t, j, u: torch.put(t, j, u, accumulate=True), (sharded, r, r), sharded),
        (lambda t, j, u: torch.put(t, j, u, accumulate=True), (r, sharded, sharded), partial),
        (lambda t, j, u: torch.put(t, j, u), (partial, r, partial), partial),
    ]
    for fn, (self_p, index_p, source_p), want in checks:
        x, j, u = (make_dtensor(whole, mesh, self_p), make_dtensor(index, mesh, index_p),
                   make_dtensor(source, mesh, source_p))
        with dtp.comm_mode() as comm:
            out = fn(x, j, u)
        assert comm.count() == 0 and not comm.fallbacks, (comm, self_p, index_p)
        assert out.placements == tuple(want), (out.placements, want)
        torch.testing.assert_close(out.full_tensor(), fn(whole, index, source))


@pytest.mark.parametrize("mesh_shape", [(3,), (2, 2)])
def test_promised_layouts_need_no_collective(mesh_shape):
    run_on_ranks(int(torch.tensor(mesh_shape).prod()), check_local, mesh_shape)


def check_out_of_range(mesh_shape):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(torch.randn(4, 3), mesh, [Shard(0)])
    with pytest.raises(IndexError, match="out of range"):
        torch.take(x, make_dtensor(torch.tensor([12]), mesh, [Replicate()]))


def test_out_of_range_index_raises():
    run_on_ranks(2, check_out_of_range, (2,))

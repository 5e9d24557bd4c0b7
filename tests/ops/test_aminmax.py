"""aminmax (ops/aminmax.py): the single-device oracle over hypothesis layouts (uneven and empty shards, nested
shards, Partial inputs, dim None or one dim, keepdim) on meshes of 2, 3, 4 and 2x2 ranks, no fallback; a Shard of
the reduced dim gives Partial(min) and Partial(max) and moves nothing."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for


def check_aminmax(mesh_shape, shape, placements, dim, keepdim, dtype, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 10
    x = make_dtensor(whole.to(dtype), mesh, placements)
    kwargs = {} if dim is None else {"dim": dim, "keepdim": keepdim}
    with dtp.comm_mode() as comm:
        assert_spmd_equal(lambda t: torch.aminmax(t, **kwargs), x, backward=False)
    assert not comm.fallbacks, comm


@settings(max_examples=14)
@given(data=st.data())
def test_aminmax_matches_single_device(data):
    world_size = data.draw(st.sampled_from([2, 3, 4]))
    mesh_shape = data.draw(mesh_shapes(world_size))
    shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    dim = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    dtype = data.draw(st.sampled_from([torch.float64, torch.int32]))
    placements = data.draw(placements_for(len(shape), len(mesh_shape), partial=dtype.is_floating_point))
    run_on_ranks(world_size, check_aminmax, mesh_shape, shape, placements, dim, data.draw(st.booleans()), dtype,
                 data.draw(st.integers(0, 999)))


def check_costs():
    mesh = dtp.init_device_mesh("cpu", (4,))
    whole = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    x = make_dtensor(whole, mesh, [Shard(1)])
    with dtp.comm_mode() as comm:
        low, high = torch.aminmax(x, dim=1)
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert low.placements == (Partial("min"),) and high.placements == (Partial("max"),)
    torch.testing.assert_close((low.full_tensor(), high.full_tensor()), tuple(torch.aminmax(whole, dim=1)))


def test_costs():
    run_on_ranks(4, check_costs)

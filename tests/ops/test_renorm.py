"""renorm (ops/renorm.py): the single-device oracle, output and gradient, over hypothesis layouts (uneven,
empty and nested shards, Partial inputs; p = 1, 2, 3.5, inf) on meshes of 2, 3, 4 and 2x2 ranks, no fallback;
a Shard of ``dim`` needs no collective, a Shard of another dim one all-reduce of x.shape[dim] numbers."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for


def check_renorm(mesh_shape, shape, placements, p, dim, maxnorm, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = make_dtensor(whole, mesh, placements, requires_grad=True)
    with dtp.comm_mode() as comm:
        out = assert_spmd_equal(lambda t: torch.renorm(t, p, dim, maxnorm), x)
    assert not comm.fallbacks, comm
    assert out.placements == tuple(Replicate() if q.is_partial() else q for q in placements), out.placements


@settings(max_examples=12)
@given(data=st.data())
def test_renorm_matches_single_device(data):
    world_size = data.draw(st.sampled_from([2, 3, 4]))
    mesh_shape = data.draw(mesh_shapes(world_size))
    p = data.draw(st.sampled_from([1.0, 2.0, 3.5, math.inf]))
    # renorm needs 2 dims or more; an inf norm over nothing raises on one device, so no empty dims there
    shape = tuple(data.draw(st.lists(st.integers(int(math.isinf(p)), 5), min_size=2, max_size=3)))
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    placements = data.draw(placements_for(len(shape), len(mesh_shape), partial=True))
    maxnorm = data.draw(st.sampled_from([0.5, 1.5, 100.0]))  # some slices scaled, some not
    run_on_ranks(world_size, check_renorm, mesh_shape, shape, placements, p, dim, maxnorm,
                 data.draw(st.integers(0, 999)))


def check_costs(mesh_shape):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    along = make_dtensor(whole, mesh, [Shard(1)] * len(mesh_shape))
    with dtp.comm_mode() as comm:
        out = torch.renorm(along, 2, 1, 1.0)
    assert comm.count() == 0 and not comm.fallbacks and out.placements == along.placements, comm
    torch.testing.assert_close(out.full_tensor(), torch.renorm(whole, 2, 1, 1.0))
    across = make_dtensor(whole, mesh, [Shard(0), Shard(2)][: len(mesh_shape)])
    for p in (2.0, 2.5, math.inf):  # one plan per p kind: floats share a cache key, the local op reads p
        with dtp.comm_mode() as comm:
            out = torch.renorm(across, p, 1, 1.0)
        assert comm.count() == comm.count("all_reduce") == len(mesh_shape) and not comm.fallbacks, comm
        assert comm.bytes() <= 2 * 5 * 8 * len(mesh_shape), comm  # 5 float64 norms per mesh dim, no gather
        assert out.placements == across.placements
        torch.testing.assert_close(out.full_tensor(), torch.renorm(whole, p, 1, 1.0))


def test_costs():
    run_on_ranks(4, check_costs, (2, 2))
    run_on_ranks(3, check_costs, (3,))

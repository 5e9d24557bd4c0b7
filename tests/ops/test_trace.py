"""trace (ops/trace.py): the single-device oracle, output and gradient, over hypothesis layouts of 2-d inputs
(uneven, empty and nested shards, Partial inputs) on meshes of 2, 3, 4 and 2x2 ranks; no fallback anywhere
(forward or backward), and a sharded input costs exactly one all-reduce of one number."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for


def check_trace(mesh_shape, shape, placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = make_dtensor(whole, mesh, placements, requires_grad=True)
    with dtp.comm_mode() as comm:
        out = assert_spmd_equal(torch.trace, x)
    assert not comm.fallbacks, comm
    for p, q in zip(placements, out.placements):
        if isinstance(p, Shard):
            assert q == Partial("sum"), out.placements


@settings(max_examples=10)
@given(data=st.data())
def test_trace_matches_single_device(data):
    world_size = data.draw(st.sampled_from([2, 3, 4]))
    mesh_shape = data.draw(mesh_shapes(world_size))
    shape = tuple(data.draw(st.lists(st.integers(0, 7), min_size=2, max_size=2)))
    placements = data.draw(placements_for(2, len(mesh_shape), partial=True))
    run_on_ranks(world_size, check_trace, mesh_shape, shape, placements, data.draw(st.integers(0, 999)))


def check_one_number_moves(mesh_shape):
    """Rows on one mesh dim, columns on the other (blocks off the diagonal hold none of it): the trace is
    local sums plus one all-reduce of a scalar per mesh dim; an integer matrix sums exactly."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = torch.arange(35, dtype=torch.int64).reshape(5, 7)
    placements = [Shard(0), Shard(1)][: len(mesh_shape)]
    x = make_dtensor(whole, mesh, placements)
    with dtp.comm_mode() as comm:
        out = torch.trace(x)
        value = out.full_tensor()
    assert not comm.fallbacks and comm.count() == comm.count("all_reduce") == len(mesh_shape), comm
    assert comm.bytes() <= 2 * 8 * len(mesh_shape), comm  # one int64 per mesh dim, ring all-reduce
    assert value.item() == torch.trace(whole).item()


def test_one_number_moves():
    run_on_ranks(4, check_one_number_moves, (2, 2))
    run_on_ranks(3, check_one_number_moves, (3,))

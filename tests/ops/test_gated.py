"""glu and prelu (ops/gated.py): the single-device oracle, outputs and gradients, over hypothesis layouts
(uneven and empty shards, nested shards, Partial inputs; a weight per channel or one weight) on meshes of 2, 3, 4
and 2x2 ranks, no fallback; and that a Shard of another dim (glu) or of the batch and channels (prelu) moves
nothing forward, and leaves a channel-sharded or Partial(sum) weight gradient."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for

F = torch.nn.functional


def _whole(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def check_glu(mesh_shape, shape, placements, dim, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(_whole(shape, seed), mesh, placements, requires_grad=True)
    with dtp.comm_mode() as comm:
        assert_spmd_equal(lambda t: F.glu(t, dim), x)
    assert not comm.fallbacks, comm


@settings(max_examples=10)
@given(data=st.data())
def test_glu_matches_single_device(data):
    world_size = data.draw(st.sampled_from([2, 3, 4]))
    mesh_shape = data.draw(mesh_shapes(world_size))
    shape = list(data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    shape[dim] = 2 * data.draw(st.integers(1, 3))  # glu halves dim
    placements = data.draw(placements_for(len(shape), len(mesh_shape), partial=True))
    run_on_ranks(world_size, check_glu, mesh_shape, tuple(shape), placements, dim, data.draw(st.integers(0, 999)))


def check_prelu(mesh_shape, shape, num_weights, place_x, place_w, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(_whole(shape, seed), mesh, place_x, requires_grad=True)
    w = make_dtensor(_whole((num_weights,), seed + 1).abs(), mesh, place_w, requires_grad=True)
    with dtp.comm_mode() as comm:
        assert_spmd_equal(F.prelu, x, w)
    assert not comm.fallbacks, comm


@settings(max_examples=10)
@given(data=st.data())
def test_prelu_matches_single_device(data):
    world_size = data.draw(st.sampled_from([2, 3, 4]))
    mesh_shape = data.draw(mesh_shapes(world_size))
    shape = tuple(data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=4)))
    channels = shape[1] if len(shape) > 1 else 1
    num_weights = data.draw(st.sampled_from([1, channels])) if channels else 1
    place_x = data.draw(placements_for(len(shape), len(mesh_shape), partial=True))
    place_w = data.draw(placements_for(1, len(mesh_shape), partial=True))
    run_on_ranks(world_size, check_prelu, mesh_shape, shape, num_weights, place_x, place_w,
                 data.draw(st.integers(0, 999)))


def check_costs():
    mesh = dtp.init_device_mesh("cpu", (2,))
    whole = _whole((4, 6, 3), 0)
    x = make_dtensor(whole, mesh, [Shard(0)])
    with dtp.comm_mode() as comm:
        out = F.glu(x, 1)
    assert comm.count() == 0 and not comm.fallbacks and out.placements == (Shard(0),), comm
    torch.testing.assert_close(out.full_tensor(), F.glu(whole, 1))
    weight = _whole((6,), 1)
    for place_x, place_w, grad_w in ((Shard(0), Replicate(), Partial("sum")), (Shard(1), Shard(0), Shard(0))):
        x = make_dtensor(whole, mesh, [place_x], requires_grad=True)
        w = make_dtensor(weight, mesh, [place_w], requires_grad=True)
        with dtp.comm_mode() as comm:
            out = F.prelu(x, w)
        assert comm.count() == 0 and not comm.fallbacks and out.placements == (place_x,), comm
        out.backward(make_dtensor(torch.ones_like(whole), mesh, [place_x]))
        assert w.grad.placements in ((grad_w,), (Replicate(),)), w.grad.placements


def test_costs():
    run_on_ranks(2, check_costs)

"""Redistribution on real gloo groups: round trips, distribute/full_tensor, exact collective counts, autograd."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dtensor_plus import DTensor, Partial, Replicate, Shard, comm_mode, distribute_tensor, init_device_mesh
from dtensor_plus.redistribute import plan_redistribute
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.strategies import layouts, make_dtensor, placements_for

WORLD_SIZES = (2, 3, 4)


def _whole(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _round_trip(mesh_shape, shape, src, dst, seed):
    mesh = init_device_mesh("cpu", mesh_shape)
    whole = _whole(shape, seed)
    x = make_dtensor(whole, mesh, src)
    y = x.redistribute(mesh, dst)
    assert y.placements == tuple(dst) and y.shape == whole.shape
    expected_local = distribute_tensor(whole, mesh, [Replicate() if p.is_partial() else p for p in dst], src_data_rank=None)
    if not any(p.is_partial() for p in dst):
        torch.testing.assert_close(y.to_local(), expected_local.to_local(), rtol=1e-6, atol=1e-6)
    back = y.redistribute(mesh, src)
    torch.testing.assert_close(back.full_tensor(), whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.full_tensor(), whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=40)
@given(data=st.data())
def test_round_trip_is_identity(world_size, data):
    mesh_shape, shape, src = data.draw(layouts(world_size, partial=True))
    dst = data.draw(placements_for(len(shape), len(mesh_shape), partial=True))
    run_on_ranks(world_size, _round_trip, mesh_shape, shape, src, dst, data.draw(st.integers(0, 2**16)))


def _distribute_full(mesh_shape, shape, placements, seed):
    mesh = init_device_mesh("cpu", mesh_shape)
    whole = _whole(shape, seed)
    x = distribute_tensor(whole, mesh, placements)
    assert torch.equal(x.full_tensor(), whole)
    local_shape, offset = x._spec.local_shape_and_offset()
    assert x.to_local().shape == local_shape
    index = tuple(slice(o, o + s) for o, s in zip(offset, local_shape))
    assert torch.equal(x.to_local(), whole[index])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=35)
@given(data=st.data())
def test_full_tensor_of_distribute_is_identity(world_size, data):
    mesh_shape, shape, placements = data.draw(layouts(world_size))
    run_on_ranks(world_size, _distribute_full, mesh_shape, shape, placements, data.draw(st.integers(0, 2**16)))


def _counts(src, dst, mesh_shape, shape):
    mesh = init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(torch.ones(shape), mesh, src)
    with comm_mode() as comm:
        x.redistribute(mesh, dst)
    return dict(comm.counts), dict(comm.sent_bytes)


def test_replicate_to_shard_moves_nothing():
    counts, sent = run_on_ranks(4, _counts, [Replicate()], [Shard(0)], (4,), (8, 8))[0]
    assert counts == {} and sent == {}


def test_shard_to_shard_is_one_all_to_all_of_three_quarters_of_the_shard():
    for counts, sent in run_on_ranks(4, _counts, [Shard(0)], [Shard(1)], (4,), (8, 8)):
        assert counts == {("all_to_all", "0"): 1}
        assert sent == {("all_to_all", "0"): 3 * (2 * 8 * 4) // 4}  # local shard is 2x8 float32


def test_partial_to_shard_is_reduce_scatter():
    for counts, sent in run_on_ranks(4, _counts, [Partial()], [Shard(0)], (4,), (8, 8)):
        assert counts == {("reduce_scatter", "0"): 1}
        assert sent == {("reduce_scatter", "0"): 3 * 8 * 8 * 4 // 4}


def test_partial_to_replicate_is_all_reduce_and_shard_to_replicate_all_gather():
    counts, _ = run_on_ranks(2, _counts, [Partial()], [Replicate()], (2,), (4,))[0]
    assert counts == {("all_reduce", "0"): 1}
    counts, sent = run_on_ranks(2, _counts, [Shard(0)], [Replicate()], (2,), (4, 2))[0]
    assert counts == {("all_gather", "0"): 1} and sent == {("all_gather", "0"): 2 * 2 * 4}


def test_planner_prefers_all_to_all_and_respects_nesting():
    steps = plan_redistribute((Shard(0),), (Shard(1),), (4,), 64, 4)
    assert steps == ((0, Shard(1)),)
    # [S0, S1] -> [S1, S0]: mesh dim 0 cannot leave dim 0 while mesh dim 1 still shards... any valid plan ends right
    steps = plan_redistribute((Shard(0), Shard(0)), (Replicate(), Shard(0)), (2, 2), 64, 4)
    assert steps[0][0] == 1, "the inner mesh dim of a nested shard must move first"


def _nested_uneven(seed):
    mesh = init_device_mesh("cpu", (2, 2))
    whole = _whole((7, 3), seed)
    x = distribute_tensor(whole, mesh, [Shard(0), Shard(0)])
    for dst in ([Replicate(), Shard(0)], [Shard(0), Replicate()], [Shard(1), Shard(0)], [Replicate(), Replicate()]):
        assert torch.equal(x.redistribute(mesh, dst).full_tensor(), whole), dst


def test_nested_uneven_shards():
    run_on_ranks(4, _nested_uneven, 3)


def _autograd(src, dst):
    mesh = init_device_mesh("cpu", (2,))
    whole = _whole((5, 4), 0).requires_grad_()
    x = distribute_tensor(whole, mesh, src)
    y = x.redistribute(mesh, dst)
    (y.full_tensor() * torch.arange(20.0).view(5, 4)).sum().backward()
    assert isinstance(x.grad, DTensor)
    torch.testing.assert_close(x.grad.full_tensor(), torch.arange(20.0).view(5, 4))
    return x.grad.placements


@pytest.mark.parametrize("src, dst", [([Shard(0)], [Replicate()]), ([Replicate()], [Shard(1)]), ([Shard(0)], [Shard(1)])])
def test_redistribute_backward(src, dst):
    for placements in run_on_ranks(2, _autograd, src, dst):
        assert placements == tuple(src)


def _distribute_traffic():
    import torch.distributed as dist

    mesh = init_device_mesh("cpu", (2, 2))
    # src_data_rank=1 is index 1 on both mesh dims (as in torch): mesh coordinate (1, 1), global rank 3
    whole = torch.arange(64.0).view(8, 8) if dist.get_rank() == 3 else torch.zeros(8, 8)
    with comm_mode() as comm:
        x = distribute_tensor(whole, mesh, [Shard(0), Shard(1)], src_data_rank=1)
    assert torch.equal(x.full_tensor(), torch.arange(64.0).view(8, 8))
    return dict(comm.counts), comm.bytes()


def test_distribute_tensor_scatters_blocks_from_the_source():
    results = run_on_ranks(4, _distribute_traffic)
    assert results[0][0] == {("scatter", "0"): 1, ("scatter", "1"): 1}
    # rank 3 sends 3 of its 4 row-blocks... along mesh dim 0 it scatters one (4, 8) half, along dim 1 one (4, 4) block
    assert results[3][1] == 4 * 8 * 4 + 4 * 4 * 4

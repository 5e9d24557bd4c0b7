"""Writes into views whose shards are not views of the base's shards (the view op had to move data) reach the
base, as on one device: scattered back by the view's inverse; a view with no inverse raises."""

import pytest
import torch

import dtensor_plus as dtp
from dtensor_plus import Replicate, Shard
from dtensor_plus.testing import run_on_ranks


def _writes(t):
    t.diagonal().fill_(-1.0)
    t.diagonal(1).add_(10.0)
    t.select(0, 2).mul_(3.0)
    t[1:4, 0].copy_(torch.tensor(7.0))
    return t


def check_writes_through_views(world):
    mesh = dtp.init_device_mesh("cpu", (world,))
    whole = torch.arange(30.0).reshape(5, 6)
    expected = _writes(whole.clone())
    for placement in (Shard(0), Shard(1), Replicate()):
        x = dtp.distribute_tensor(whole, mesh, [placement])
        out = _writes(x)
        assert out is x and x.placements == (placement,)
        torch.testing.assert_close(x.full_tensor(), expected, rtol=0, atol=0, msg=f"{placement}")


@pytest.mark.parametrize("world", [2, 3])
def test_writes_through_views_reach_the_base(world):
    run_on_ranks(world, check_writes_through_views, world)


def check_view_without_inverse_raises():
    mesh = dtp.init_device_mesh("cpu", (2,))
    x = dtp.distribute_tensor(torch.arange(30.0).reshape(5, 6), mesh, [Shard(0)])
    view = x.diagonal()  # row-sharded: a Partial, not a view of the blocks
    with pytest.raises(RuntimeError, match="cannot be scattered back"):
        view.unbind(0)[1].fill_(0.0)  # unbind's pieces: no inverse kept


def test_view_without_inverse_raises():
    run_on_ranks(2, check_view_without_inverse_raises)


def _block_on(rank: int, rows: int, cols: int) -> torch.Tensor:
    """Rank ``rank``'s rows of ``torch.arange(...).reshape(-1, cols)``; on rank 0 laid out transposed (its strides
    admit no view to fewer columns), elsewhere contiguous."""
    block = torch.arange(rank * rows * cols, (rank + 1) * rows * cols, dtype=torch.float32).reshape(rows, cols)
    return block.t().contiguous().t() if rank == 0 else block


def _writes_through_copied_views(t):
    v = t.view(12, 2)  # rank 0's block admits no such view: its local block is a reshaped copy there only
    v.mul_(10.0)
    v[3].fill_(-1.0)  # a view (select) of the copied view
    v.view(-1).add_(0.5)  # a view of the copied view
    v.t().sub_(2.0)
    v.copy_(v * 2)
    v.t_().add_(1.0)  # an in-place view op on the copied view, then a write
    return t


def check_writes_through_views_copied_on_one_rank():
    mesh = dtp.init_device_mesh("cpu", (2,))
    rank = torch.distributed.get_rank()
    x = dtp.DTensor.from_local(_block_on(rank, 2, 6), mesh, [Shard(0)], shape=(4, 6), stride=(6, 1))
    expected = _writes_through_copied_views(torch.arange(24.0).reshape(4, 6))
    assert x._local_tensor.is_contiguous() == (rank != 0)
    _writes_through_copied_views(x)
    torch.testing.assert_close(x.full_tensor(), expected, rtol=0, atol=0)


def test_writes_through_views_copied_on_one_rank_reach_the_base():
    """A view whose local block had to be copied on one rank only (its strides admit no view there) still writes
    through to the base on that rank, with the same collectives on every rank."""
    run_on_ranks(2, check_writes_through_views_copied_on_one_rank)

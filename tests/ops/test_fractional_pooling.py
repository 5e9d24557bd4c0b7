"""fractional_max_pool2d/3d and their backwards (ops/fractional_pooling.py): outputs, indices and input gradients
against one device on 2 and 3 ranks (uneven and empty blocks), batched and unbatched, with the random samples
given Replicate or sharded; the output keeps the leading shard, and nothing falls back."""

import pytest
import torch
import torch.nn.functional as F

import dtensor_plus as dtp
from dtensor_plus import Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor

R = Replicate()
POOLS = {2: F.fractional_max_pool2d, 3: F.fractional_max_pool3d}

# (input shape, number of spatial dims, input placement, samples placement, output placement)
CASES = [
    ((2, 3, 9, 9), 2, Shard(0), R, Shard(0)),
    ((2, 3, 9, 9), 2, Shard(1), R, Shard(1)),
    ((2, 3, 9, 9), 2, R, Shard(1), Shard(1)),  # the samples' shard slices the input for free
    ((3, 8, 8), 2, Shard(0), R, Shard(0)),  # unbatched: channels match the samples' dim 1
    ((2, 3, 9, 9), 2, Shard(2), R, R),  # a spatial shard: gathered
    ((2, 2, 6, 5, 5), 3, Shard(1), R, Shard(1)),
    ((2, 5, 5, 5), 3, R, Shard(1), Shard(0)),  # unbatched 3d, samples sharded along the channels
]


def _check(world_size):
    mesh = dtp.init_device_mesh("cpu", (world_size,))
    g = torch.Generator().manual_seed(0)
    for shape, num_spatial, x_placement, s_placement, expected in CASES:
        batched = len(shape) == num_spatial + 2
        samples = torch.rand((shape[0] if batched else 1, shape[-num_spatial - 1], num_spatial), generator=g,
                             dtype=torch.float64)
        x = make_dtensor(torch.randn(shape, generator=g, dtype=torch.float64), mesh, [x_placement],
                         requires_grad=True)
        s = make_dtensor(samples, mesh, [s_placement])

        def pool(a, b):
            return POOLS[num_spatial](a, 2, output_size=3, return_indices=True, _random_samples=b)

        with dtp.comm_mode() as comm:
            out, indices = assert_spmd_equal(pool, x, s)
        assert not comm.fallbacks, (shape, comm.fallbacks)
        assert tuple(out.placements) == tuple(indices.placements) == (expected,), (shape, out.placements)


@pytest.mark.parametrize("world_size", [2, 3])
def test_fractional_max_pool_matches_one_device(world_size):
    run_on_ranks(world_size, _check, world_size)


def _drawn_samples():
    """F.fractional_max_pool2d drawing its own samples (a plain tensor, the same on every rank with one seed)."""
    mesh = dtp.init_device_mesh("cpu", (2,))
    whole = torch.randn(4, 3, 7, 7, generator=torch.Generator().manual_seed(1))
    x = make_dtensor(whole, mesh, [Shard(0)])
    torch.manual_seed(5)
    with dtp.comm_mode() as comm:
        out = F.fractional_max_pool2d(x, 3, output_ratio=(0.5, 0.5))
    torch.manual_seed(5)
    assert torch.equal(out.full_tensor(), F.fractional_max_pool2d(whole, 3, output_ratio=(0.5, 0.5)))
    return tuple(out.placements), dict(comm.fallbacks)


def test_samples_drawn_by_functional_stay_local():
    for placements, fallbacks in run_on_ranks(2, _drawn_samples):
        assert placements == (Shard(0),) and not fallbacks

"""Upsampling, reflection/replication pads and pixel (un)shuffle (ops/resampling.py) on hypothesis layouts
(batch, channel or spatial dims sharded, Replicate, Partial; uneven and empty shards) against one device,
outputs and gradients; batch- and channel-sharded inputs need no collective, forward or backward."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, placements_for

OPS = {
    "nearest": lambda t: F.interpolate(t, scale_factor=2, mode="nearest"),
    "bilinear": lambda t: F.interpolate(t, size=(5, 3), mode="bilinear", align_corners=False),
    "bicubic": lambda t: F.interpolate(t, scale_factor=1.5, mode="bicubic", align_corners=True),
    "reflect": lambda t: F.pad(t, (1, 2, 2, 1), mode="reflect"),
    "replicate": lambda t: F.pad(t, (2, 0, 1, 3), mode="replicate"),
    "pixel_shuffle": lambda t: F.pixel_shuffle(t, 2),
    "pixel_unshuffle": lambda t: F.pixel_unshuffle(t, 2),
}


def check_resampling(mesh_shape, name, shape, placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = make_dtensor(whole, mesh, placements, requires_grad=True)
    assert_spmd_equal(OPS[name], x, atol=1e-10, rtol=1e-10)


@st.composite
def _case(draw):
    mesh_shape = draw(st.sampled_from([(2,), (3,), (2, 2)]))
    name = draw(st.sampled_from(sorted(OPS)))
    channels = 4 * draw(st.integers(1, 2)) if name == "pixel_shuffle" else draw(st.integers(1, 3))
    spatial = (4, 6) if name in ("pixel_unshuffle", "reflect") else (draw(st.integers(3, 4)), draw(st.integers(3, 5)))
    shape = (draw(st.integers(1, 4)), channels) + spatial
    placements = draw(placements_for(len(shape), len(mesh_shape), partial=True))
    return mesh_shape, name, shape, placements, draw(st.integers(0, 99))


@settings(max_examples=12)
@given(_case())
def test_resampling_matches_one_device(case):
    mesh_shape = case[0]
    run_on_ranks(int(torch.tensor(mesh_shape).prod()), check_resampling, *case)


def check_leading_shards_stay_local():
    mesh = dtp.init_device_mesh("cpu", (2,))
    for name in sorted(OPS):
        for dim in (0,) if name.startswith("pixel") else (0, 1):  # pixel ops mix channels: batch only
            shape = (3, 8, 4, 6)
            x = make_dtensor(torch.randn(shape, dtype=torch.float64), mesh, [Shard(dim)], requires_grad=True)
            with dtp.comm_mode() as comm:
                out = OPS[name](x)
                out.backward(torch.ones_like(out))
            assert comm.count() == 0 and not comm.fallbacks, (name, dim, comm)
            assert out.placements == (Shard(dim),) and x.grad.placements == (Shard(dim),), (name, dim)


def test_leading_shards_stay_local():
    run_on_ranks(2, check_leading_shards_stay_local)

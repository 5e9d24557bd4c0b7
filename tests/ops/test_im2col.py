"""F.unfold / F.fold (im2col, col2im) and channel_shuffle (ops/im2col.py) on hypothesis layouts (batch, channel,
spatial or window dims sharded, Replicate, Partial; uneven and empty shards; batched or not) against one device,
outputs and gradients, never through the fallback; and the channel shards that stay local."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, placements_for

UNFOLD = {"kernel_size": (2, 2), "dilation": (1, 2), "padding": (1, 0), "stride": (1, 2)}


def _fold(cols, spatial):
    return F.fold(cols, spatial, **UNFOLD)


def _fn(name, spatial):
    return {"unfold": lambda t: F.unfold(t, **UNFOLD), "fold": lambda t: _fold(t, spatial),
            "channel_shuffle": lambda t: F.channel_shuffle(t, 2)}[name]


def check_op(mesh_shape, name, shape, spatial, placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = make_dtensor(whole, mesh, placements, requires_grad=True)
    with dtp.comm_mode() as comm:
        assert_spmd_equal(_fn(name, spatial), x, atol=1e-10, rtol=1e-10)
    assert not comm.fallbacks, comm.fallbacks


@st.composite
def _case(draw):
    mesh_shape = draw(st.sampled_from([(2,), (3,), (2, 2)]))
    name = draw(st.sampled_from(["unfold", "fold", "channel_shuffle"]))
    batch = (draw(st.integers(1, 4)),) if draw(st.booleans()) or name == "channel_shuffle" else ()
    spatial = (draw(st.integers(3, 5)), draw(st.integers(3, 6)))
    channels = draw(st.integers(1, 4))
    if name == "unfold":
        shape = batch + (channels,) + spatial
    elif name == "fold":  # columns of an unfold of (channels, *spatial): the window count L follows
        num_windows = F.unfold(torch.empty((1, 1) + spatial, device="meta"), **UNFOLD).shape[-1]
        shape = batch + (channels * 4, num_windows)
    else:
        shape = batch + (2 * channels,) + spatial[: draw(st.integers(1, 2))]  # it needs > 2 dims
    placements = draw(placements_for(len(shape), len(mesh_shape), partial=True))
    return mesh_shape, name, shape, spatial, placements, draw(st.integers(0, 99))


@settings(max_examples=16)
@given(_case())
def test_matches_one_device(case):
    run_on_ranks(int(torch.tensor(case[0]).prod()), check_op, *case)


def check_channel_shards_stay_local():
    mesh = dtp.init_device_mesh("cpu", (2,))
    # 4 channels, a 2x2 kernel: channels 2 + 2 own column rows 8 + 8
    x = make_dtensor(torch.randn(3, 4, 5, 6, dtype=torch.float64), mesh, [Shard(1)], requires_grad=True)
    with dtp.comm_mode() as comm:
        cols = F.unfold(x, **UNFOLD)
        back = _fold(cols, (5, 6))
        back.backward(torch.ones_like(back))
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert cols.placements == (Shard(1),) and back.placements == (Shard(1),) and x.grad.placements == (Shard(1),)
    whole = x.full_tensor()
    torch.testing.assert_close(back.full_tensor(), _fold(F.unfold(whole, **UNFOLD), (5, 6)))
    # 3 channels: rows 6 + 6 but channels 2 + 1, so the channels are gathered, and the answer is still right
    x = make_dtensor(torch.randn(3, 3, 5, 6, dtype=torch.float64), mesh, [Shard(1)])
    cols = F.unfold(x, **UNFOLD)
    assert cols.placements == (Replicate(),)
    torch.testing.assert_close(cols.full_tensor(), F.unfold(x.full_tensor(), **UNFOLD))
    # channel_shuffle moves channels only: batch and spatial shards stay
    for dim in (0, 2):
        x = make_dtensor(torch.randn(3, 6, 5, dtype=torch.float64), mesh, [Shard(dim)])
        with dtp.comm_mode() as comm:
            out = F.channel_shuffle(x, 3)
        assert comm.count() == 0 and out.placements == (Shard(dim),), (dim, comm)
        torch.testing.assert_close(out.full_tensor(), F.channel_shuffle(x.full_tensor(), 3))


def test_channel_shards_stay_local():
    run_on_ranks(2, check_channel_shards_stay_local)

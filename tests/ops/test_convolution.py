"""Convolution and pooling rules (ops/convolution.py, ops/pooling.py): conv / conv_transpose and the pools on
hypothesis layouts of input, weight and bias (batch, channels, spatial dims, Partial), checked against one
device (outputs and gradients) on meshes of 2, 3, 4 and 2x2 ranks with uneven and empty shards; the
layouts that promise no collective (batch, out channels) have none, forward and backward."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for

WORLD_SIZES = [2, 3, 4]
CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_TRANSPOSES = {1: F.conv_transpose1d, 2: F.conv_transpose2d}


def _whole(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def check_conv(mesh_shape, transposed, x_shape, w_shape, bias, options, placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(_whole(x_shape, seed), mesh, placements[0], requires_grad=True)
    w = make_dtensor(_whole(w_shape, seed + 1), mesh, placements[1], requires_grad=True)
    b = None
    if bias:
        b_size = w_shape[1] * options["groups"] if transposed else w_shape[0]
        b = make_dtensor(_whole((b_size,), seed + 2), mesh, placements[2], requires_grad=True)
    conv = (CONV_TRANSPOSES if transposed else CONVS)[len(x_shape) - 2]
    assert_spmd_equal(lambda t, u, v: conv(t, u, v, **options), x, w, b, atol=1e-9, rtol=1e-9)


@st.composite
def _conv_case(draw, transposed):
    world_size = draw(st.sampled_from(WORLD_SIZES))
    mesh_shape = draw(mesh_shapes(world_size))
    num_spatial = draw(st.sampled_from([1, 2] if transposed else [1, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 2))
    spatial = tuple(draw(st.integers(kernel, 4)) for _ in range(num_spatial))
    x_shape = (draw(st.integers(0, 3)), c_in) + spatial
    w_shape = ((c_in, c_out // groups) if transposed else (c_out, c_in // groups)) + (kernel,) * num_spatial
    options = {"stride": draw(st.integers(1, 2)), "groups": groups}
    if not transposed:
        options["padding"] = draw(st.integers(0, 1))
    mesh_ndim = len(mesh_shape)
    placements = (draw(placements_for(len(x_shape), mesh_ndim, partial=True)),
                  draw(placements_for(len(w_shape), mesh_ndim, partial=True)),
                  draw(placements_for(1, mesh_ndim, partial=True)))
    bias = draw(st.booleans())
    return world_size, (mesh_shape, transposed, x_shape, w_shape, bias, options, placements, draw(st.integers(0, 99)))


@pytest.mark.parametrize("transposed", [False, True])
@settings(max_examples=15)
@given(data=st.data())
def test_convolution_matches_single_device(transposed, data):
    world_size, case = data.draw(_conv_case(transposed))
    run_on_ranks(world_size, check_conv, *case)


# -- pooling --------------------------------------------------------------------------------------------


def _max_unpool(x, num_spatial):
    pool = {1: F.max_pool1d, 2: F.max_pool2d}[num_spatial]
    unpool = {1: F.max_unpool1d, 2: F.max_unpool2d}[num_spatial]
    values, indices = pool(x, 2, return_indices=True)
    return unpool(values, indices, 2, output_size=x.shape[-num_spatial:])


POOLS = {
    "max": lambda x, n: getattr(F, f"max_pool{n}d")(x, 2, stride=1, return_indices=True),
    "avg": lambda x, n: getattr(F, f"avg_pool{n}d")(x, 2, padding=1, count_include_pad=False),
    "adaptive_avg": lambda x, n: getattr(F, f"adaptive_avg_pool{n}d")(x, 2),
    "adaptive_max": lambda x, n: getattr(F, f"adaptive_max_pool{n}d")(x, 3, return_indices=True),
    "max_unpool": lambda x, n: _max_unpool(x, min(n, 2)),
}


def check_pool(name, mesh_shape, shape, num_spatial, placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(_whole(shape, seed), mesh, placements, requires_grad=True)
    assert_spmd_equal(lambda t: POOLS[name](t, num_spatial), x)


@st.composite
def _pool_case(draw, name):
    world_size = draw(st.sampled_from(WORLD_SIZES))
    mesh_shape = draw(mesh_shapes(world_size))
    num_spatial = draw(st.sampled_from([1, 2] if name == "max_unpool" else [1, 2, 3]))
    batched = draw(st.booleans())
    leading = ((draw(st.integers(0, 3)),) if batched else ()) + (draw(st.integers(1, 3)),)
    shape = leading + tuple(draw(st.integers(2, 4)) for _ in range(num_spatial))
    placements = draw(placements_for(len(shape), len(mesh_shape), partial=True))
    return world_size, (name, mesh_shape, shape, num_spatial, placements, draw(st.integers(0, 99)))


@pytest.mark.parametrize("name", sorted(POOLS))
@settings(max_examples=8)
@given(data=st.data())
def test_pooling_matches_single_device(name, data):
    world_size, case = data.draw(_pool_case(name))
    run_on_ranks(world_size, check_pool, *case)


# -- layouts without collectives ------------------------------------------------------------------------


def check_conv_layouts_local(mesh_shape):
    """Batch-sharded input (mesh dim 0) and out-channel-sharded weight (mesh dim 1, if any): conv2d, max_pool2d
    and their backward run without a collective; weight and bias grads come back Partial over the batch."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    two = len(mesh_shape) == 2
    r = Replicate()
    x = make_dtensor(_whole((5, 3, 6, 6), 0), mesh, (Shard(0), r)[: len(mesh_shape)], requires_grad=True)
    w = make_dtensor(_whole((4, 3, 3, 3), 1), mesh, (r, Shard(0))[: len(mesh_shape)], requires_grad=True)
    b = make_dtensor(_whole((4,), 2), mesh, (r, Shard(0))[: len(mesh_shape)], requires_grad=True)
    out_placements = (Shard(0), Shard(1)) if two else (Shard(0),)
    grad = make_dtensor(_whole((5, 4, 2, 2), 3), mesh, out_placements)
    with dtp.comm_mode() as comm:
        y = F.max_pool2d(F.conv2d(x, w, b, padding=1), 3)
        y.backward(grad)
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert y.placements == out_placements
    assert x.grad.placements == ((Shard(0), Partial()) if two else (Shard(0),))
    assert w.grad.placements == ((Partial(), Shard(0)) if two else (Partial(),))
    full_x, full_w, full_b = (t.full_tensor().detach().requires_grad_(True) for t in (x, w, b))
    want = F.max_pool2d(F.conv2d(full_x, full_w, full_b, padding=1), 3)
    want.backward(grad.full_tensor())
    torch.testing.assert_close(y.full_tensor(), want)
    for got, expected in ((x.grad, full_x.grad), (w.grad, full_w.grad), (b.grad, full_b.grad)):
        torch.testing.assert_close(got.full_tensor(), expected)


@pytest.mark.parametrize("mesh_shape", [(3,), (2, 2)])
def test_batch_and_out_channel_layouts_need_no_collective(mesh_shape):
    run_on_ranks(int(torch.tensor(mesh_shape).prod()), check_conv_layouts_local, mesh_shape)

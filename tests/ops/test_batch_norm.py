"""Batch norm rules (ops/batch_norm.py): F.batch_norm in training and eval on hypothesis layouts of the input,
the affine parameters and the running statistics, checked against one device (outputs, gradients, and the
running statistics updated in place), uneven and empty shards included."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for

WORLD_SIZES = [2, 3, 4]


def _whole(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _batch_norm(t, mean, var, w, b, training, form):
    """F.batch_norm (native_batch_norm), or the forms other paths reach: _native_batch_norm_legit (with and
    without running statistics) and _batch_norm_with_update (training with statistics)."""
    if form == "functional":
        return F.batch_norm(t, mean, var, w, b, training=training, momentum=0.3)
    if form == "with_update" and training and mean is not None:
        return torch.ops.aten._batch_norm_with_update(t, w, b, mean, var, 0.3, 1e-5)[0]
    if mean is None:
        return torch.ops.aten._native_batch_norm_legit.no_stats(t, w, b, training, 0.3, 1e-5)[0]
    return torch.ops.aten._native_batch_norm_legit(t, w, b, mean, var, training, 0.3, 1e-5)[0]


def check_batch_norm(mesh_shape, shape, training, stats, placements, stat_placements, form, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    channels = shape[1]
    x = make_dtensor(_whole(shape, seed) * 2 + 1, mesh, placements[0], requires_grad=True)
    weight = make_dtensor(_whole((channels,), seed + 1), mesh, placements[1], requires_grad=True)
    bias = make_dtensor(_whole((channels,), seed + 2), mesh, placements[2], requires_grad=True)
    whole_mean, whole_var = _whole((channels,), seed + 3), _whole((channels,), seed + 4).abs() + 0.5
    mean = make_dtensor(whole_mean, mesh, stat_placements) if stats else None
    var = make_dtensor(whole_var, mesh, stat_placements) if stats else None
    single_mean, single_var = whole_mean.clone(), whole_var.clone()

    def fn(t, w, b):
        distributed = isinstance(t, dtp.DTensor)
        m, v = (mean, var) if distributed else ((single_mean, single_var) if stats else (None, None))
        return _batch_norm(t, m, v, w, b, training, form)

    assert_spmd_equal(fn, x, weight, bias, atol=1e-9, rtol=1e-9)
    if stats:  # updated in place in training, in their own layout
        assert mean.placements == tuple(stat_placements)
        torch.testing.assert_close(mean.full_tensor(), single_mean)
        torch.testing.assert_close(var.full_tensor(), single_var)


@st.composite
def _case(draw, training):
    world_size = draw(st.sampled_from(WORLD_SIZES))
    mesh_shape = draw(mesh_shapes(world_size))
    # training needs more than one value per channel (torch raises otherwise), so N * spatial >= 2 there
    shape = (draw(st.integers(2, 4)), draw(st.integers(1, 5))) + tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    mesh_ndim = len(mesh_shape)
    stats = not training or draw(st.booleans())
    placements = (draw(placements_for(len(shape), mesh_ndim, partial=True)),
                  draw(placements_for(1, mesh_ndim, partial=True)), draw(placements_for(1, mesh_ndim, partial=True)))
    stat_placements = draw(placements_for(1, mesh_ndim))  # Shard(0) or Replicate: what running stats hold
    form = draw(st.sampled_from(["functional", "legit", "with_update"]))
    return world_size, (mesh_shape, shape, training, stats, placements, stat_placements, form, draw(st.integers(0, 99)))


@pytest.mark.parametrize("training", [False, True])
@settings(max_examples=20)
@given(data=st.data())
def test_batch_norm_matches_single_device(training, data):
    world_size, case = data.draw(_case(training))
    run_on_ranks(world_size, check_batch_norm, *case)


def check_channel_sharded_is_local(mesh_shape):
    """Channels sharded, stats Shard(0): training forward and backward without a collective."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    placements = (Shard(1),) + (Replicate(),) * (len(mesh_shape) - 1)
    stat_placements = (Shard(0),) + (Replicate(),) * (len(mesh_shape) - 1)
    x = make_dtensor(_whole((4, 5, 3), 0), mesh, placements, requires_grad=True)
    weight = make_dtensor(_whole((5,), 1), mesh, stat_placements, requires_grad=True)
    mean = make_dtensor(torch.zeros(5, dtype=torch.float64), mesh, stat_placements)
    var = make_dtensor(torch.ones(5, dtype=torch.float64), mesh, stat_placements)
    grad = make_dtensor(_whole((4, 5, 3), 2), mesh, placements)
    with dtp.comm_mode() as comm:
        y = F.batch_norm(x, mean, var, weight, training=True)
        y.backward(grad)
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert y.placements == x.grad.placements == placements and weight.grad.placements == stat_placements


@pytest.mark.parametrize("mesh_shape", [(3,), (2, 2)])
def test_channel_sharded_batch_norm_needs_no_collective(mesh_shape):
    run_on_ranks(int(torch.tensor(mesh_shape).prod()), check_channel_sharded_is_local, mesh_shape)

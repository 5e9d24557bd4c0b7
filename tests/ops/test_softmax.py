"""Softmax and log-softmax rules: the single-device oracle over hypothesis layouts, and the collectives issued."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import layouts, make_dtensor, placements_for

aten = torch.ops.aten
WORLD_SIZES = [2, 3, 4]


def _whole(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _softmax(log, dim):
    return (lambda t: F.log_softmax(t, dim)) if log else (lambda t: F.softmax(t, dim))


# -- ranks ----------------------------------------------------------------------------------------------


def check_softmax(mesh_shape, shape, placements, dim, log, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(_whole(shape, seed), mesh, placements, requires_grad=True)
    out = assert_spmd_equal(_softmax(log, dim), x)
    d = dim % max(len(shape), 1)
    for placement in out.placements:
        assert not placement.is_partial() and not placement.is_shard(d), out.placements


def check_backward_op(mesh_shape, shape, grad_placements, out_placements, dim, log, seed):
    """The backward op alone, with grad and output laid out independently (Partial grads included)."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole_grad, whole_out = _whole(shape, seed), _whole(shape, seed + 1)
    if not log:
        whole_out = whole_out.softmax(dim) if whole_out.ndim else whole_out.exp() / whole_out.exp()
    grad = make_dtensor(whole_grad, mesh, grad_placements)
    out = make_dtensor(whole_out, mesh, out_placements)
    op = aten._log_softmax_backward_data.default if log else aten._softmax_backward_data.default
    result = op(grad, out, dim, torch.float64)
    torch.testing.assert_close(result.full_tensor(), op(whole_grad, whole_out, dim, torch.float64))
    d = dim % max(len(shape), 1)
    for g, o, r in zip(grad_placements, out_placements, result.placements):
        if g.is_partial() and g.reduce_op in ("sum", "avg") and (o.is_replicate() or o.is_partial() or o.is_shard(d)):
            assert r == g, (grad_placements, out_placements, result.placements)
        assert not r.is_shard(d)


def check_collectives(mesh_shape):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    rest = [Replicate()] * (len(mesh_shape) - 1)
    x = make_dtensor(_whole((6, 5), 0), mesh, [Shard(0)] + rest, requires_grad=True)
    with dtp.comm_mode() as comm:
        y = F.softmax(x, -1)
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert y.placements == (Shard(0), *rest)
    grad = make_dtensor(_whole((6, 5), 1), mesh, [Shard(0)] + rest)
    with dtp.comm_mode() as comm:
        gx = aten._softmax_backward_data(grad, y, -1, torch.float64)
    assert comm.count() == 0 and not comm.fallbacks and gx.placements == (Shard(0), *rest), comm
    # A Partial(sum) grad on a replicated output stays Partial: no all-reduce.
    partial_grad = make_dtensor(_whole((6, 5), 1), mesh, [Partial()] + rest)
    z = F.log_softmax(make_dtensor(_whole((6, 5), 2), mesh, [Replicate()] + rest), 0)
    with dtp.comm_mode() as comm:
        gz = aten._log_softmax_backward_data(partial_grad, z, 0, torch.float64)
    assert comm.count() == 0 and gz.placements == (Partial(), *rest), comm
    # Softmax along the sharded dim: one all-gather, output replicated.
    with dtp.comm_mode() as comm:
        y0 = F.softmax(x, 0)
    assert comm.count() == 1 and comm.count("all_gather") == 1 and not comm.fallbacks, comm
    assert y0.placements == (Replicate(), *rest)


# -- properties -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=30)
@given(data=st.data())
def test_softmax_matches_single_device(world_size, data):
    mesh_shape, shape, placements = data.draw(layouts(world_size, max_ndim=3, min_ndim=0, partial=True))
    ndim = len(shape)
    dim = data.draw(st.integers(-max(ndim, 1), max(ndim, 1) - 1))
    log = data.draw(st.booleans())
    run_on_ranks(world_size, check_softmax, mesh_shape, shape, placements, dim, log, data.draw(st.integers(0, 999)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@settings(max_examples=15)
@given(data=st.data())
def test_softmax_backward_op_any_layouts(world_size, data):
    mesh_shape, shape, grad_placements = data.draw(layouts(world_size, max_ndim=3, min_ndim=1, partial=True))
    out_placements = data.draw(placements_for(len(shape), len(mesh_shape), partial=True))
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    log = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 999))
    run_on_ranks(world_size, check_backward_op, mesh_shape, shape, grad_placements, out_placements, dim, log, seed)


@pytest.mark.parametrize("mesh_shape", [(2,), (3,), (2, 2)])
def test_softmax_collectives(mesh_shape):
    run_on_ranks(int(torch.tensor(mesh_shape).prod()), check_collectives, mesh_shape)

"""log_sigmoid_forward / log_sigmoid_backward (ops/activations.py) on hypothesis layouts against one device,
outputs and gradients, never through the fallback; a Partial gradient passes the backward without a collective."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import layouts, make_dtensor


def check_logsigmoid(mesh_shape, shape, placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 5
    x = make_dtensor(whole, mesh, placements, requires_grad=True)
    with dtp.comm_mode() as comm:
        assert_spmd_equal(F.logsigmoid, x, atol=1e-10, rtol=1e-10)
    assert not comm.fallbacks, comm.fallbacks


@settings(max_examples=8)
@given(layouts(4, partial=True), st.integers(0, 99))
def test_logsigmoid_matches_one_device(layout, seed):
    run_on_ranks(4, check_logsigmoid, *layout, seed)


def check_layouts_kept():
    mesh = dtp.init_device_mesh("cpu", (2,))
    aten = torch.ops.aten
    x = make_dtensor(torch.randn(5, 3, dtype=torch.float64), mesh, [Shard(0)])
    grad = make_dtensor(torch.randn(5, 3, dtype=torch.float64), mesh, [Partial()])
    with dtp.comm_mode() as comm:
        out, buffer = aten.log_sigmoid_forward(x)
        x_whole, buffer_whole = (t.redistribute(placements=[Replicate()]) for t in (x, buffer))
        grad_input = aten.log_sigmoid_backward(grad, x_whole, buffer_whole)
    assert (out.placements, buffer.placements, grad_input.placements) == ((Shard(0),), (Shard(0),), (Partial(),))
    assert comm.count() == 2, comm  # the two all-gathers asked for above, none in the ops
    want = aten.log_sigmoid_backward(grad.full_tensor(), x.full_tensor(), aten.log_sigmoid_forward(x.full_tensor())[1])
    torch.testing.assert_close(grad_input.full_tensor(), want)


def test_layouts_kept():
    run_on_ranks(2, check_layouts_kept)

"""grid_sampler_2d/3d and their backwards (ops/grid_sample.py) on hypothesis layouts of input and grid (batch,
channel, spatial, grid-point or coordinate dims sharded, Replicate, Partial; uneven and empty shards) against one
device, outputs and gradients, never through the fallback; and the layouts that must stay local."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, placements_for


def _tensors(mesh, shape, grid_shape, placements, grid_placements, seed, input_grad=True):
    gen = torch.Generator().manual_seed(seed)
    whole = torch.randn(shape, generator=gen, dtype=torch.float64)
    grid = torch.rand(grid_shape, generator=gen, dtype=torch.float64) * 2.4 - 1.2  # some points fall outside
    return (make_dtensor(whole, mesh, placements, requires_grad=input_grad),
            make_dtensor(grid, mesh, grid_placements, requires_grad=True))


def check_grid_sample(mesh_shape, shape, grid_shape, placements, grid_placements, options, input_grad, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x, grid = _tensors(mesh, shape, grid_shape, placements, grid_placements, seed, input_grad)
    with dtp.comm_mode() as comm:
        assert_spmd_equal(lambda a, g: F.grid_sample(a, g, **options), x, grid, atol=1e-10, rtol=1e-10)
    assert not comm.fallbacks, comm.fallbacks


@st.composite
def _case(draw):
    mesh_shape = draw(st.sampled_from([(2,), (3,), (2, 2)]))
    num_spatial = draw(st.sampled_from([2, 3]))
    modes = ["bilinear", "nearest"] + (["bicubic"] if num_spatial == 2 else [])
    options = {"mode": draw(st.sampled_from(modes)), "align_corners": draw(st.booleans()),
               "padding_mode": draw(st.sampled_from(["zeros", "border", "reflection"]))}
    n = draw(st.integers(1, 4))
    shape = (n, draw(st.integers(1, 3))) + tuple(draw(st.integers(2, 4)) for _ in range(num_spatial))
    grid_shape = (n,) + tuple(draw(st.integers(1, 3)) for _ in range(num_spatial)) + (num_spatial,)
    placements = draw(placements_for(len(shape), len(mesh_shape), partial=True))
    grid_placements = draw(placements_for(len(grid_shape), len(mesh_shape), partial=True))
    # input_grad False: the backward's output_mask leaves grad_input out
    input_grad, seed = draw(st.booleans()), draw(st.integers(0, 99))
    return mesh_shape, shape, grid_shape, placements, grid_placements, options, input_grad, seed


@settings(max_examples=14)
@given(_case())
def test_grid_sample_matches_one_device(case):
    run_on_ranks(int(torch.tensor(case[0]).prod()), check_grid_sample, *case)


def check_local_layouts():
    """The aten ops themselves on the layouts that need no collective: the placements the rule promises."""
    mesh = dtp.init_device_mesh("cpu", (2,))
    aten = torch.ops.aten
    # (input, grid) placements -> (out, grad_input, grad_grid) placements; grad_output is laid out like out
    cases = {
        (Shard(0), Shard(0)): (Shard(0), Shard(0), Shard(0)),
        (Shard(1), Replicate()): (Shard(1), Shard(1), Partial()),
        (Replicate(), Shard(2)): (Shard(3), Partial(), Shard(2)),
        (Partial(), Replicate()): (Partial(), Replicate(), Partial()),
    }
    for (pi, pg), (out_p, gi_p, gg_p) in cases.items():
        x, grid = _tensors(mesh, (3, 4, 5, 6), (3, 4, 5, 2), [pi], [pg], seed=0, input_grad=False)
        grad = torch.randn(3, 4, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grad = make_dtensor(grad, mesh, [Replicate() if out_p.is_partial() else out_p])
        with dtp.comm_mode() as comm:
            out = aten.grid_sampler_2d(x, grid, 0, 0, False)
            gi, gg = aten.grid_sampler_2d_backward(grad, x, grid, 0, 0, False, [True, True])
        assert comm.count() == 0 and not comm.fallbacks, (pi, pg, comm)
        assert (out.placements, gi.placements, gg.placements) == ((out_p,), (gi_p,), (gg_p,)), (pi, pg)
        x_whole, grid_whole = x.full_tensor(), grid.full_tensor()
        whole = aten.grid_sampler_2d_backward(grad.full_tensor(), x_whole, grid_whole, 0, 0, False, [True, True])
        torch.testing.assert_close(out.full_tensor(), aten.grid_sampler_2d(x_whole, grid_whole, 0, 0, False))
        torch.testing.assert_close((gi.full_tensor(), gg.full_tensor()), whole)


def test_local_layouts():
    run_on_ranks(2, check_local_layouts)

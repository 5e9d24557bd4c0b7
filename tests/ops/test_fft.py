"""FFT rules (ops/fft.py): torch.fft functions on hypothesis layouts checked against one device (outputs and
gradients), uneven and empty shards included; no collective when only untransformed dims are sharded."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for

WORLD_SIZES = [2, 3, 4]
# name -> (function of (x, dims), input is complex); every output is viewed as real for the gradient check
FUNCTIONS = {
    "fft": (lambda x, dims: torch.fft.fft(x, dim=dims[0], norm="ortho"), True),
    "ifft": (lambda x, dims: torch.fft.ifft(x, dim=dims[0]), True),
    "rfft": (lambda x, dims: torch.fft.rfft(x, dim=dims[0]), False),
    "irfft": (lambda x, dims: torch.fft.irfft(x, dim=dims[0], norm="forward"), True),
    "hfft": (lambda x, dims: torch.fft.hfft(x, n=4, dim=dims[0]), True),
    "ihfft": (lambda x, dims: torch.fft.ihfft(x, dim=dims[0]), False),
    "fftn": (lambda x, dims: torch.fft.fftn(x, dim=dims), True),
    "rfftn": (lambda x, dims: torch.fft.rfftn(x, dim=dims), False),
    "irfftn": (lambda x, dims: torch.fft.irfftn(x, dim=dims), True),
}


def _as_real(out):
    return torch.view_as_real(out.resolve_conj()) if out.is_complex() else out


def check_fft(name, mesh_shape, shape, dims, placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    fn, is_complex = FUNCTIONS[name]
    whole = torch.randn(shape, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.complex128 if is_complex else torch.float64)
    if is_complex:  # max / min of complex numbers mean nothing
        placements = [Replicate() if p.is_partial() and p.reduce_op in ("max", "min") else p for p in placements]
    x = make_dtensor(whole, mesh, placements, requires_grad=True)
    assert_spmd_equal(lambda t: _as_real(fn(t, dims)), x)


@st.composite
def _case(draw, name):
    world_size = draw(st.sampled_from(WORLD_SIZES))
    mesh_shape = draw(mesh_shapes(world_size))
    ndim = draw(st.integers(1, 3))
    # sizes >= 1: torch refuses an empty transform (and MKL an empty batch) on one device too; small sizes
    # on 3 or 4 ranks still leave some local blocks empty
    smallest = 2 if name.startswith("irfft") else 1  # c2r of m entries gives 2 (m - 1) points
    shape = tuple(draw(st.lists(st.integers(smallest, 5), min_size=ndim, max_size=ndim)))
    num_dims = 1 if name in ("fft", "ifft", "rfft", "irfft", "hfft", "ihfft") else draw(st.integers(1, ndim))
    dims = draw(st.permutations(range(ndim)))[:num_dims]
    placements = draw(placements_for(ndim, len(mesh_shape), partial=True))
    return world_size, (name, mesh_shape, shape, list(dims), placements, draw(st.integers(0, 999)))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@settings(max_examples=6)
@given(data=st.data())
def test_fft_matches_single_device(name, data):
    world_size, case = data.draw(_case(name))
    run_on_ranks(world_size, check_fft, *case)


def check_untransformed_shards_stay(mesh_shape):
    """A batch dim sharded (and a Partial(sum) mesh dim): rfft then irfft run without any collective."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    placements = [Shard(0), Partial()][: len(mesh_shape)]
    whole = torch.randn(5, 6, dtype=torch.float64)
    x = make_dtensor(whole, mesh, placements, requires_grad=True)
    with dtp.comm_mode() as comm:
        y = torch.fft.irfft(torch.fft.rfft(x, dim=1), n=6, dim=1)
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert y.placements == tuple(placements)
    torch.testing.assert_close(y.full_tensor(), whole)


@pytest.mark.parametrize("mesh_shape", [(3,), (2, 2)])
def test_untransformed_shards_need_no_collective(mesh_shape):
    run_on_ranks(int(torch.tensor(mesh_shape).prod()), check_untransformed_shards_stay, mesh_shape)

"""kthvalue, mode, median and nanmedian (ops/selections.py): the single-device oracle, values, indices and gradient, over hypothesis layouts
(uneven, empty and nested shards, Partial inputs) on meshes of 2, 3, 4 and 2x2 ranks, no fallback; shards of
the other dims stay put without any collective."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for


_SELECTIONS = {
    "kthvalue": lambda t, k, dim, keepdim: torch.kthvalue(t, k, dim, keepdim),
    "median": lambda t, k, dim, keepdim: torch.median(t, dim, keepdim),
    "nanmedian": lambda t, k, dim, keepdim: torch.nanmedian(t, dim, keepdim),
    "median_all": lambda t, k, dim, keepdim: torch.median(t),
    "mode": lambda t, k, dim, keepdim: torch.mode(t.floor(), dim, keepdim).values,  # ties: values only
}


def check_kthvalue(mesh_shape, shape, placements, dim, k, keepdim, seed, name="kthvalue"):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    # distinct values: the index of a tied k-th value is implementation-defined
    whole = torch.randperm(max(1, torch.Size(shape).numel()), generator=torch.Generator().manual_seed(seed))
    whole = whole[: torch.Size(shape).numel()].reshape(shape).double()
    x = make_dtensor(whole, mesh, placements, requires_grad=True)
    with dtp.comm_mode() as comm:
        assert_spmd_equal(lambda t: _SELECTIONS[name](t, k, dim, keepdim), x)
    assert not comm.fallbacks, comm


@settings(max_examples=16)
@given(data=st.data())
def test_selections_match_single_device(data):
    world_size = data.draw(st.sampled_from([2, 3, 4]))
    mesh_shape = data.draw(mesh_shapes(world_size))
    shape = tuple(data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    if shape[dim] == 0:  # kthvalue of an empty dim raises on one device: give it one element
        shape = tuple(1 if d == dim % len(shape) else n for d, n in enumerate(shape))
    name = data.draw(st.sampled_from(sorted(_SELECTIONS)))
    if name == "median_all":  # the median of no elements raises on one device
        shape = tuple(max(n, 1) for n in shape)
    k = data.draw(st.integers(1, shape[dim]))
    placements = data.draw(placements_for(len(shape), len(mesh_shape), partial=True))
    run_on_ranks(world_size, check_kthvalue, mesh_shape, shape, placements, dim, k, data.draw(st.booleans()),
                 data.draw(st.integers(0, 999)), name)


def check_other_dims_stay(mesh_shape):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = make_dtensor(whole, mesh, [Shard(0), Shard(2)][: len(mesh_shape)])
    with dtp.comm_mode() as comm:
        values, indices = torch.kthvalue(x, 2, 1)
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert values.placements == indices.placements == (Shard(0), Shard(1))[: len(mesh_shape)]
    want = torch.kthvalue(whole, 2, 1)
    torch.testing.assert_close(values.full_tensor(), want.values)
    torch.testing.assert_close(indices.full_tensor(), want.indices)
    y = make_dtensor(whole, mesh, [Shard(1)] * len(mesh_shape))  # the selected dim: gathered, then Replicate
    values, _ = torch.kthvalue(y, 3, 1, keepdim=True)
    assert values.placements == (Replicate(),) * len(mesh_shape)
    torch.testing.assert_close(values.full_tensor(), torch.kthvalue(whole, 3, 1, keepdim=True).values)


def test_other_dims_stay():
    run_on_ranks(4, check_other_dims_stay, (2, 2))

"""_grouped_mm and histc (ops/grouped_mm.py): the single-device oracle, outputs and gradients, over hypothesis
layouts (uneven and empty shards, empty groups) on meshes of 2, 3 and 2x2 ranks, with no fallback; the loop
reference equals torch's kernel; a split contraction costs one all-reduce and no gather."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.ops.grouped_mm import grouped_mm_reference
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for

# torch's CPU kernel wants the whole operands' rows 16-byte aligned: feature sizes are multiples of 4 floats
FEATURES = st.sampled_from([4, 8, 12])


def _operands(form, group_sizes, k, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(group_sizes)
    shapes = {
        "2d3d": ((total, k), (len(group_sizes), k, n)),
        "3d2d": ((len(group_sizes), m, k), (k, total)),
        "2d2d": ((m, total), (total, n)),
        "3d3d": ((len(group_sizes), m, k), (len(group_sizes), k, n)),
    }[form]
    offs = torch.tensor(group_sizes).cumsum(0).to(torch.int32)
    return [torch.randn(s, generator=g) for s in shapes], (None if form == "3d3d" else offs)


def check_grouped_mm(mesh_shape, form, group_sizes, k, n, m, placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    (a, b), offs = _operands(form, group_sizes, k, n, m, seed)
    xa = make_dtensor(a, mesh, placements[0], requires_grad=True)
    xb = make_dtensor(b, mesh, placements[1], requires_grad=True)
    with dtp.comm_mode() as comm, dtp.implicit_replication():
        assert_spmd_equal(lambda x, y: torch._grouped_mm(x, y, offs=offs), xa, xb, atol=1e-4, rtol=1e-4)
    assert not comm.fallbacks, comm.fallbacks


@settings(max_examples=6)
@given(data=st.data())
def test_grouped_mm_matches_single_device(data):
    world_size = data.draw(st.sampled_from([2, 3, 4]))
    mesh_shape = data.draw(mesh_shapes(world_size))
    form = data.draw(st.sampled_from(["2d3d", "3d2d", "2d2d", "3d3d"]))
    # 2d2d groups its contraction: the whole operand's row stride is the total, keep it a multiple of 4
    sizes = st.integers(0, 5) if form != "2d2d" else st.sampled_from([0, 4, 8])
    group_sizes = data.draw(st.lists(sizes, min_size=1, max_size=4))
    if not sum(group_sizes):  # the kernel refuses an empty grouped dim (its strides), the oracle must run
        group_sizes[-1] = 4
    if form == "3d2d" and sum(group_sizes) % 4:  # b (K, total): rows of 16 bytes
        group_sizes[-1] += 4 - sum(group_sizes) % 4
    ndims = {"2d3d": (2, 3), "3d2d": (3, 2), "2d2d": (2, 2), "3d3d": (3, 3)}[form]
    placements = [data.draw(placements_for(d, len(mesh_shape))) for d in ndims]
    k, n, m = data.draw(FEATURES), data.draw(FEATURES), data.draw(st.integers(1, 5))
    run_on_ranks(world_size, check_grouped_mm, mesh_shape, form, group_sizes, k, n, m, placements,
                 data.draw(st.integers(0, 999)))


def check_split_contraction():
    """MoE rows whole, the contraction split (a column-wise layer's output into a row-wise expert): local
    products, one all-reduce of the (S, N) result, nothing gathered."""
    mesh = dtp.init_device_mesh("cpu", (2,))
    (a, b), offs = _operands("2d3d", [3, 0, 4], 8, 4, 1, 0)
    xa = dtp.distribute_tensor(a, mesh, [Shard(1)])
    xb = dtp.distribute_tensor(b, mesh, [Shard(1)])
    with dtp.comm_mode() as comm, dtp.implicit_replication():
        out = torch._grouped_mm(xa, xb, offs=offs)
        assert out.placements == (Partial("sum"),)
        whole = out.redistribute(placements=[Replicate()]).to_local()
    assert comm.count() == comm.count("all_reduce") == 1 and not comm.fallbacks, comm
    torch.testing.assert_close(whole, torch._grouped_mm(a, b, offs=offs), atol=1e-5, rtol=1e-5)


def test_split_contraction_is_one_all_reduce():
    run_on_ranks(2, check_split_contraction)


@settings(max_examples=6)
@given(data=st.data())
def test_reference_equals_torch_kernel(data):
    form = data.draw(st.sampled_from(["2d3d", "3d2d", "2d2d", "3d3d"]))
    sizes = st.sampled_from([0, 4, 8]) if form in ("2d2d", "3d2d") else st.integers(0, 5)
    group_sizes = data.draw(st.lists(sizes, min_size=1, max_size=4))
    if not sum(group_sizes):  # an empty grouped dim has strides the kernel refuses
        group_sizes[-1] = 4
    (a, b), offs = _operands(form, group_sizes, 4, 8, 3, data.draw(st.integers(0, 999)))
    torch.testing.assert_close(grouped_mm_reference(a, b, offs), torch._grouped_mm(a, b, offs=offs), atol=1e-5, rtol=1e-5)


def check_histc(mesh_shape, shape, placements, bins, low, high, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = torch.randint(-3, 8, shape, generator=torch.Generator().manual_seed(seed)).float()
    x = make_dtensor(whole, mesh, placements)
    with dtp.comm_mode() as comm:
        out = torch.histc(x, bins=bins, min=low, max=high)
        got = out.full_tensor()
    torch.testing.assert_close(got, torch.histc(whole, bins=bins, min=low, max=high))
    assert not comm.fallbacks, comm.fallbacks
    if low != high and any(p.is_shard() for p in placements):  # counted where the block lies: Partial
        assert any(p == Partial("sum") for p in out.placements), out.placements


@settings(max_examples=6)
@given(data=st.data())
def test_histc_matches_single_device(data):
    world_size = data.draw(st.sampled_from([2, 3, 4]))
    mesh_shape = data.draw(mesh_shapes(world_size))
    shape = tuple(data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=2)))
    placements = data.draw(placements_for(len(shape), len(mesh_shape), partial=True))
    low = data.draw(st.sampled_from([0, -2]))
    high = data.draw(st.sampled_from([0, 5]))
    run_on_ranks(world_size, check_histc, mesh_shape, shape, placements, data.draw(st.integers(1, 6)), low, high,
                 data.draw(st.integers(0, 999)))

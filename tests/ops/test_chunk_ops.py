"""narrow_copy and _chunk_cat (ops/chunk_ops.py): the single-device oracle over hypothesis layouts (uneven,
empty and nested shards, Partial) on meshes of 2, 3, 4 and 2x2 ranks, no fallback; narrow_copy's gradient
(slice_backward) too; a narrow that lines up with the blocks and a chunk_cat of leading-dim shards move nothing."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def check_narrow_copy(mesh_shape, shape, placements, dim, start, length, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x = make_dtensor(_randn(shape, seed), mesh, placements, requires_grad=True)
    with dtp.comm_mode() as comm:
        # torch's own backward of a negative start is broken (slice_backward gets end = start + length)
        assert_spmd_equal(lambda t: torch.narrow_copy(t, dim, start, length), x, backward=start >= 0)
    assert not comm.fallbacks, comm


@settings(max_examples=12)
@given(data=st.data())
def test_narrow_copy_matches_single_device(data):
    world_size = data.draw(st.sampled_from([2, 3, 4]))
    mesh_shape = data.draw(mesh_shapes(world_size))
    shape = tuple(data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=3)))
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    start = data.draw(st.integers(0, shape[dim]))
    length = data.draw(st.integers(0, shape[dim] - start))
    if data.draw(st.booleans()) and start < shape[dim]:
        start -= shape[dim]  # a negative start counts from the end
    placements = data.draw(placements_for(len(shape), len(mesh_shape), partial=True))
    run_on_ranks(world_size, check_narrow_copy, mesh_shape, shape, placements, dim, start, length,
                 data.draw(st.integers(0, 999)))


def check_chunk_cat(mesh_shape, shapes, placements, dim, num_chunks, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    tensors = [make_dtensor(_randn(s, seed + i), mesh, p) for i, (s, p) in enumerate(zip(shapes, placements))]
    with dtp.comm_mode() as comm:
        assert_spmd_equal(lambda *ts: torch._chunk_cat(list(ts), dim, num_chunks), *tensors, backward=False)
    assert not comm.fallbacks, comm


@settings(max_examples=12)
@given(data=st.data())
def test_chunk_cat_matches_single_device(data):
    world_size = data.draw(st.sampled_from([2, 3, 4]))
    mesh_shape = data.draw(mesh_shapes(world_size))
    leading = tuple(data.draw(st.lists(st.integers(1, 5), min_size=0, max_size=2)))  # torch refuses empty inputs
    dim = len(leading)
    shapes = [leading + tuple(data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=2)))
              for _ in range(data.draw(st.integers(1, 3)))]
    if data.draw(st.booleans()) and len({len(s) for s in shapes}) == 1:
        dim -= len(shapes[0])  # a negative dim, allowed when every input has the same ndim
    placements = [data.draw(placements_for(len(s), len(mesh_shape), partial=True)) for s in shapes]
    run_on_ranks(world_size, check_chunk_cat, mesh_shape, shapes, placements, dim, data.draw(st.integers(1, 4)),
                 data.draw(st.integers(0, 999)))


def check_no_collective(mesh_shape):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    n = len(mesh_shape)
    whole = _randn((8, 5, 6), 0)
    x = make_dtensor(whole, mesh, [Shard(0)] * n)  # 8 rows in blocks of 2 (nested on 2x2) or 4
    with dtp.comm_mode() as comm:
        out = torch.narrow_copy(x, 0, 0, 8)
        inner = torch.narrow_copy(x, 2, 1, 4)
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert out.placements == inner.placements == x.placements, (out.placements, inner.placements)
    torch.testing.assert_close(out.full_tensor(), whole)
    torch.testing.assert_close(inner.full_tensor(), whole.narrow(2, 1, 4))
    a, b = make_dtensor(whole, mesh, [Shard(0)] * n), make_dtensor(_randn((8, 3), 1), mesh, [Shard(0)] * n)
    p, q = make_dtensor(whole, mesh, [Partial()] * n), make_dtensor(_randn((8, 3), 1), mesh, [Partial()] * n)
    with dtp.comm_mode() as comm:
        rows = torch._chunk_cat([a, b], 1, 3)
        partial = torch._chunk_cat([p, q], 1, 3)
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert rows.placements == a.placements and partial.placements == p.placements
    want = torch._chunk_cat([whole, b.full_tensor()], 1, 3)
    torch.testing.assert_close(rows.full_tensor(), want)
    torch.testing.assert_close(partial.full_tensor(), want)


def test_no_collective():
    run_on_ranks(4, check_no_collective, (2, 2))
    run_on_ranks(2, check_no_collective, (2,))

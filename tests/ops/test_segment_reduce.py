"""segment_reduce and _segment_reduce_backward (ops/segment_reduce.py): the single-device oracle, output and
gradient, with lengths or offsets, over hypothesis layouts of data (any dim sharded, uneven and empty shards,
Partial) and of lengths, on meshes of 2, 3, 4 and 2x2 ranks; no fallback, and dims off the axis stay local."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, mesh_shapes, placements_for

REDUCES = ["sum", "mean", "max", "min", "prod"]


def _lengths(leading, axis_size, num_segments, seed):
    """Random segment lengths (some empty) adding up to ``axis_size`` in every leading row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(max(1, torch.Size(leading).numel())):
        cuts = torch.randint(0, axis_size + 1, (num_segments - 1,), generator=g).sort().values
        bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([axis_size])])
        rows.append(bounds.diff())
    return torch.stack(rows)[: torch.Size(leading).numel()].reshape(*leading, num_segments)


def check_segment_reduce(mesh_shape, shape, axis, num_segments, reduce, use_offsets, placements, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lengths = _lengths(shape[:axis], shape[axis], num_segments, seed + 1)
    x = make_dtensor(whole, mesh, placements[0], requires_grad=True)
    if use_offsets:
        index = torch.cat([torch.zeros_like(lengths[..., :1]), lengths.cumsum(-1)], -1)
        name = "offsets"
    else:
        index, name = lengths, "lengths"

    def fn(t, i):
        if not isinstance(i, DTensor):  # the oracle's gathered (n, 1) tensors may carry strides (1, n), which
            i = i.clone(memory_format=torch.contiguous_format)  # torch's kernel misreads (the rule copes)
            t = t.clone(memory_format=torch.contiguous_format)
        return torch.segment_reduce(t, reduce, axis=axis, unsafe=True, **{name: i})

    with dtp.comm_mode() as comm:
        assert_spmd_equal(fn, x, make_dtensor(index, mesh, placements[1]))
    assert not comm.fallbacks, comm


@settings(max_examples=12)
@given(data=st.data())
def test_segment_reduce_matches_single_device(data):
    world_size = data.draw(st.sampled_from([2, 3, 4]))
    mesh_shape = data.draw(mesh_shapes(world_size))
    shape = tuple(data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    axis = data.draw(st.integers(0, len(shape) - 1))
    placements = (data.draw(placements_for(len(shape), len(mesh_shape), partial=True)),
                  data.draw(placements_for(axis + 1, len(mesh_shape))))
    run_on_ranks(world_size, check_segment_reduce, mesh_shape, shape, axis, data.draw(st.integers(1, 3)),
                 data.draw(st.sampled_from(REDUCES)), data.draw(st.booleans()), placements,
                 data.draw(st.integers(0, 999)))


def check_local(mesh_shape):
    """Data sharded on a leading dim and a trailing dim, lengths on the leading one: no collective at all,
    forward and backward, and the output keeps both shards."""
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    placements = [Shard(0), Shard(2)][: len(mesh_shape)]
    whole = torch.randn(5, 6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lengths = _lengths((5,), 6, 3, 1)
    x = make_dtensor(whole, mesh, placements, requires_grad=True)
    index = make_dtensor(lengths, mesh, [Shard(0), Replicate()][: len(mesh_shape)])
    grad = make_dtensor(torch.randn(5, 3, 3, dtype=torch.float64), mesh, placements)
    with dtp.comm_mode() as comm:
        out = torch.segment_reduce(x, "max", lengths=index, axis=1)
        out.backward(grad)
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert out.placements == tuple(placements), out.placements
    want = whole.clone().requires_grad_(True)
    expected = torch.segment_reduce(want, "max", lengths=lengths, axis=1)
    expected.backward(grad.full_tensor())
    torch.testing.assert_close(out.full_tensor(), expected)
    torch.testing.assert_close(x.grad.full_tensor(), want.grad)


def test_off_axis_dims_stay_local():
    run_on_ranks(4, check_local, (2, 2))

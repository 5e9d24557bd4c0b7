"""Group norm (ops/group_norm.py) on hypothesis layouts (batch, channel or spatial dims sharded, weight and bias
sharded or not, Replicate, Partial; uneven and empty shards) against one device, outputs and gradients, never
through the fallback; the whole-groups test of ops/block_shards.py; channel shards that stay local."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.ops.block_shards import keeps_blocks
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor, placements_for


def _tensors(mesh, shape, placements, param_placements, seed, affine=True):
    gen = torch.Generator().manual_seed(seed)
    x = make_dtensor(torch.randn(shape, generator=gen, dtype=torch.float64), mesh, placements, requires_grad=True)
    if not affine:
        return x, None, None
    w, b = (make_dtensor(torch.randn(shape[1], generator=gen, dtype=torch.float64), mesh, param_placements,
                         requires_grad=True) for _ in range(2))
    return x, w, b


def check_group_norm(mesh_shape, shape, groups, placements, param_placements, affine, seed):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    x, w, b = _tensors(mesh, shape, placements, param_placements, seed, affine)
    with dtp.comm_mode() as comm:
        assert_spmd_equal(lambda a, w, b: F.group_norm(a, groups, w, b), x, w, b, atol=1e-10, rtol=1e-10)
    assert not comm.fallbacks, comm.fallbacks


@st.composite
def _case(draw):
    mesh_shape = draw(st.sampled_from([(2,), (3,), (2, 2)]))
    groups, per_group = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    # the first spatial dim >= 2: F.group_norm wants more than one value a group
    spatial = (draw(st.integers(2, 3)),) + tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(0, 1))))
    shape = (draw(st.integers(1, 4)), groups * per_group) + spatial
    placements = draw(placements_for(len(shape), len(mesh_shape), partial=True))
    param_placements = draw(placements_for(1, len(mesh_shape)))
    return mesh_shape, shape, groups, placements, param_placements, draw(st.booleans()), draw(st.integers(0, 99))


@settings(max_examples=14)
@given(_case())
def test_group_norm_matches_one_device(case):
    run_on_ranks(int(torch.tensor(case[0]).prod()), check_group_norm, *case)


@pytest.mark.parametrize(
    "placements, mesh_shape, num_blocks, block, expected",
    [
        ((Shard(1),), (2,), 4, 2, True),  # 8 channels in 4 groups: 4 + 4 channels, 2 + 2 groups
        ((Shard(1),), (2,), 3, 2, False),  # 6 channels in 3 groups: 3 + 3 cuts a group
        ((Shard(1),), (2,), 3, 4, False),  # im2col, C=3, 2x2 kernel: rows 6 + 6 against channels 2 + 1
        ((Shard(1),), (3,), 8, 2, True),  # uneven: channels 6 + 6 + 4, groups 3 + 3 + 2
        ((Shard(1),), (4,), 3, 1, True),  # one entry per block: any chunking, an empty one too
        ((Shard(1), Shard(1)), (2, 2), 4, 2, True),  # nested: 8 channels 2 + 2 + 2 + 2
        ((Shard(1), Shard(1)), (2, 2), 6, 2, False),  # nested: 12 channels 6 + 6, then 3 + 3 cuts a group
        ((Shard(0), Replicate()), (2, 2), 3, 2, True),  # the block dim is not sharded
    ],
)
def test_keeps_blocks(placements, mesh_shape, num_blocks, block, expected):
    assert keeps_blocks(placements, 1, mesh_shape, num_blocks, block) is expected


def _args(grad, x, mean, rstd, w):
    """native_group_norm_backward's arguments for (3, 8, 5) inputs in 4 groups, every gradient asked for."""
    return grad, x, mean, rstd, w, 3, 8, 5, 4, [True, True, True]


def check_channel_shards_stay_local():
    mesh = dtp.init_device_mesh("cpu", (2,))
    aten = torch.ops.aten
    # 8 channels in 4 groups on 2 ranks: whole groups; weight and bias split alike
    x, w, b = _tensors(mesh, (3, 8, 5), [Shard(1)], [Shard(0)], seed=0)
    with dtp.comm_mode() as comm:
        out, mean, rstd = aten.native_group_norm(x, w, b, 3, 8, 5, 4, 1e-5)
        grad = out * 2
        grads = aten.native_group_norm_backward(*_args(grad, x, mean, rstd, w))
    assert comm.count() == 0 and not comm.fallbacks, comm
    assert [t.placements for t in (out, mean, rstd, *grads)] == [(Shard(1),)] * 4 + [(Shard(0),)] * 2
    whole = [t.full_tensor() for t in (x, w, b)]
    want_out, want_mean, want_rstd = aten.native_group_norm(*whole, 3, 8, 5, 4, 1e-5)
    torch.testing.assert_close(tuple(t.full_tensor() for t in (out, mean, rstd)), (want_out, want_mean, want_rstd))
    want = aten.native_group_norm_backward(*_args(want_out * 2, whole[0], want_mean, want_rstd, whole[1]))
    torch.testing.assert_close(tuple(g.full_tensor() for g in grads), want)
    # batch-sharded: the parameter gradients are partial sums over the rows
    x, w, b = _tensors(mesh, (3, 8, 5), [Shard(0)], [Replicate()], seed=1)
    out, mean, rstd = aten.native_group_norm(x, w, b, 3, 8, 5, 4, 1e-5)
    with dtp.comm_mode() as comm:
        grads = aten.native_group_norm_backward(*_args(out, x, mean, rstd, w))
    assert comm.count() == 0 and [g.placements for g in grads] == [(Shard(0),), (Partial(),), (Partial(),)]
    want = aten.native_group_norm_backward(*_args(*(t.full_tensor() for t in (out, x, mean, rstd, w))))
    torch.testing.assert_close(tuple(g.full_tensor() for g in grads), want)


def test_channel_shards_stay_local():
    run_on_ranks(2, check_channel_shards_stay_local)

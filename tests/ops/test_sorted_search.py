"""isin, searchsorted and bucketize (ops/sorted_search.py): the single-device oracle on meshes of 2, 3 (uneven
and empty blocks) and 2x2 ranks, the output placements the rule promises, and no fallback."""

import pytest
import torch

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor

R, P = Replicate(), Partial("sum")


def _ints(shape, low, high, seed):
    """Small integers as floats: plenty of ties between values and the table, where left and right differ."""
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed)).to(torch.float64)


def _sorted(shape, seed):
    return torch.sort(_ints(shape, 0, 8, seed), dim=-1).values


# (name, call, table, values, table placements, values placements, output placements), for a 1-d mesh of any
# size; the table is the op's first tensor argument for searchsorted, its second for isin and bucketize.
CASES = [
    ("isin values sharded", lambda t, v: torch.isin(v, t), _ints((6,), 0, 8, 1), _ints((5, 3), 0, 8, 2),
     [R], [Shard(0)], (Shard(0),)),
    ("isin invert, table gathered", lambda t, v: torch.isin(v, t, invert=True), _ints((6,), 0, 8, 1),
     _ints((5, 3), 0, 8, 2), [Shard(0)], [Shard(1)], (Shard(1),)),
    ("searchsorted values sharded", lambda t, v: torch.searchsorted(t, v), _sorted((7,), 3), _ints((3, 5), -1, 9, 4),
     [R], [Shard(1)], (Shard(1),)),
    ("searchsorted left counts", lambda t, v: torch.searchsorted(t, v), _sorted((7,), 3), _ints((3, 5), -1, 9, 4),
     [Shard(0)], [R], (P,)),
    ("searchsorted right counts", lambda t, v: torch.searchsorted(t, v, right=True), _sorted((7,), 3),
     _ints((4,), -1, 9, 5), [Shard(0)], [R], (P,)),
    ("searchsorted side=right int32", lambda t, v: torch.searchsorted(t, v, side="right", out_int32=True),
     _sorted((5,), 6), _ints((4,), -1, 9, 7), [Shard(0)], [R], (P,)),
    ("searchsorted batched leading", lambda t, v: torch.searchsorted(t, v), _sorted((5, 6), 8), _ints((5, 3), -1, 9, 9),
     [Shard(0)], [R], (Shard(0),)),
    ("searchsorted batched counts", lambda t, v: torch.searchsorted(t, v, right=True), _sorted((4, 7), 10),
     _ints((4, 3), -1, 9, 11), [Shard(1)], [R], (P,)),
    ("searchsorted sorter gathered", lambda t, v: torch.searchsorted(t, v, sorter=torch.argsort(t)),
     _ints((7,), 0, 8, 12), _ints((4,), -1, 9, 13), [Shard(0)], [R], (R,)),
    ("bucketize values sharded", lambda t, v: torch.bucketize(v, t), _sorted((6,), 14), _ints((5, 2), -1, 9, 15),
     [R], [Shard(0)], (Shard(0),)),
    ("bucketize counts", lambda t, v: torch.bucketize(v, t, right=True), _sorted((6,), 14), _ints((5, 2), -1, 9, 15),
     [Shard(0)], [R], (P,)),
]


def _check_cases(world_size):
    mesh = dtp.init_device_mesh("cpu", (world_size,))
    for name, call, table, values, table_placements, value_placements, expected in CASES:
        t = make_dtensor(table, mesh, table_placements)
        v = make_dtensor(values, mesh, value_placements)
        with dtp.comm_mode() as comm:
            out = assert_spmd_equal(call, t, v, backward=False)
        assert not comm.fallbacks, (name, comm.fallbacks)
        assert tuple(out.placements) == expected, (name, out.placements)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sorted_search_matches_one_device(world_size):
    run_on_ranks(world_size, _check_cases, world_size)


def _two_dim_mesh():
    """Both kinds at once on a 2x2 mesh: the sequence split on mesh dim 0 (counts), the values on mesh dim 1."""
    mesh = dtp.init_device_mesh("cpu", (2, 2))
    table, values = _sorted((9,), 20), _ints((5, 3), -1, 9, 21)
    t = make_dtensor(table, mesh, [Shard(0), R])
    v = make_dtensor(values, mesh, [R, Shard(0)])
    with dtp.comm_mode() as comm:
        search, bucket = torch.searchsorted(t, v), torch.bucketize(v, t)
    assert not comm.fallbacks and not comm.counts, comm
    assert torch.equal(search.full_tensor(), torch.searchsorted(table, values))
    assert torch.equal(bucket.full_tensor(), torch.bucketize(values, table))
    return tuple(search.placements), tuple(bucket.placements)


def test_two_dim_mesh_keeps_both_shards_without_communication():
    for placements in run_on_ranks(4, _two_dim_mesh):
        assert placements == ((P, Shard(0)), (P, Shard(0)))

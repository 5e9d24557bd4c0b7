"""_local_scalar_dense (ops/local_scalar.py): ``.item()`` of a one-element DTensor on every layout gives the
single-device number with the cheapest collective (none for Replicate, an all-gather of the one element for
Shard, an all-reduce for Partial). Without a fallback only once the dispatcher lets a rule describe an op
that returns no tensor (see the module docstring): that check is an expected failure until then."""

import pytest
import torch

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.testing import run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor

LAYOUTS = [((Replicate(),), (), None), ((Shard(0),), (1,), "all_gather"), ((Partial("sum"),), (), "all_reduce"),
           ((Partial("max"),), (1, 1), "all_reduce"), ((Shard(1), Partial("avg")), (1, 1), None)]


def check_item(mesh_shape, placements, shape, collective, no_fallback):
    mesh = dtp.init_device_mesh("cpu", mesh_shape)
    whole = torch.tensor(2.5, dtype=torch.float64).reshape(shape)
    x = make_dtensor(whole, mesh, placements)
    with dtp.comm_mode() as comm:
        value = x.item()
    assert value == 2.5, value
    if collective is not None:
        assert comm.count() == comm.count(collective) == 1, comm
    elif all(p.is_replicate() for p in placements):
        assert comm.count() == 0, comm
    if no_fallback:
        assert not comm.fallbacks, comm


@pytest.mark.parametrize("placements, shape, collective", LAYOUTS)
def test_item_matches_single_device(placements, shape, collective):
    mesh_shape = (2,) * len(placements)
    run_on_ranks(2 ** len(placements), check_item, mesh_shape, placements, shape, collective, False)


def test_item_needs_no_fallback():
    run_on_ranks(2, check_item, (2,), (Shard(0),), (1,), "all_gather", True)

"""Partial("product") (torch's name; "prod" reads the same): the collectives reduce with c10d PRODUCT, the planner
moves it to Replicate and Shard (uneven and empty shards), and no rule treats it as a sum: ops on it equal one
device, with inputs split into factors (x / 2^(n-1) on index 0, 2 elsewhere) that a sum or max would get wrong.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import dtensor_plus as dtp
from dtensor_plus import Partial, Replicate, Shard
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.strategies import make_dtensor


def test_prod_is_product():
    assert Partial("prod") == Partial("product") and Partial("prod").reduce_op == "product"
    assert hash(Partial("prod")) == hash(Partial("product"))
    with pytest.raises(ValueError, match="unknown"):
        Partial("times")


def _collectives(world):
    mesh = dtp.init_device_mesh("cpu", (world,))
    rank = mesh.get_local_rank(0)
    torch.manual_seed(0)
    whole = torch.rand(7, 2) + 0.5
    x = make_dtensor(whole, mesh, [Partial("product")])
    assert not torch.equal(x.to_local(), whole if rank == 0 else torch.ones_like(whole))  # real factors
    torch.testing.assert_close(x.full_tensor(), whole)
    torch.testing.assert_close(x.redistribute(placements=[Shard(0)]).full_tensor(), whole)  # reduce-scatter 7 rows
    one_row = make_dtensor(whole[:1], mesh, [Partial("product")]).redistribute(placements=[Shard(0)])
    assert one_row.to_local().shape[0] == (1 if rank == 0 else 0)  # empty shards
    torch.testing.assert_close(one_row.full_tensor(), whole[:1])
    exact = {}
    for dtype in (torch.int16, torch.uint64, torch.bool, torch.int64):
        values = torch.tensor([3, 0, 1, 2]).to(dtype)
        local = values if rank == 0 else torch.tensor([2, 5, 1, 3]).to(dtype)
        got = dtp.DTensor.from_local(local, mesh, [Partial("product")]).full_tensor()
        want = values
        for _ in range(world - 1):
            want = want * torch.tensor([2, 5, 1, 3]).to(dtype) if dtype != torch.bool else want & torch.tensor([2, 5, 1, 3]).bool()
        exact[str(dtype)] = torch.equal(got, want)
    assert all(exact.values()), exact
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_product_collectives_and_planner(world):
    assert run_on_ranks(world, _collectives, world) == [True] * world


def _two_d():
    mesh = dtp.init_device_mesh("cpu", (2, 2))
    torch.manual_seed(0)
    whole = torch.rand(5, 3) + 0.5
    x = make_dtensor(whole, mesh, [Partial("product"), Shard(0)])
    for target in ([Replicate(), Replicate()], [Shard(1), Shard(0)], [Shard(0), Replicate()]):
        torch.testing.assert_close(x.redistribute(placements=target).full_tensor(), whole)
    scalar = make_dtensor(torch.zeros(()), mesh, [Partial("product"), Replicate()])
    scalar.copy_(torch.tensor(3.0))  # a plain scalar copied into a Partial(product): 1 off index 0
    assert scalar.full_tensor().item() == 3.0
    return True


def test_product_on_a_2x2_mesh_and_copy_of_a_scalar():
    assert run_on_ranks(4, _two_d) == [True] * 4


_OPS = {
    "add_scalar": lambda t: t + 1.5,
    "add_replicate": lambda t, r: t + r,
    "mul_scalar": lambda t: t * 3.0,
    "mul_partial": lambda t: t * t,
    "neg": lambda t: -t,
    "clone": lambda t: t.clone(),
    "to_int": lambda t: (t * 4).to(torch.int64),
    "to_double": lambda t: t.double(),
    "sum": lambda t: t.sum(0),
    "prod": lambda t: t.prod(),
    "amax": lambda t: t.amax(-1),
    "exp": lambda t: t.exp(),
    "relu_sub": lambda t: (t - 1).relu(),
    "view_t": lambda t: t.t().reshape(-1),
    "matmul": lambda t, r: t @ r.t(),
    "softmax": lambda t: t.softmax(-1),
    "cumsum": lambda t: t.cumsum(0),
    "where": lambda t: torch.where(t > 1, t, 0.0),
    "index_put": lambda t: t.index_put((torch.tensor([0]),), torch.tensor(2.0)),
    "setitem": lambda t: _setitem(t.clone()),
}


def _setitem(t):
    t[t > 1.2] = 3.0
    return t


def _ops_on_product(world, names, rows):
    mesh = dtp.init_device_mesh("cpu", (world,))
    torch.manual_seed(rows)
    whole, other = torch.rand(rows, 3) + 0.5, torch.rand(rows, 3)
    for name in names:
        fn = _OPS[name]
        x = make_dtensor(whole, mesh, [Partial("product")], requires_grad=name != "to_int")
        args = (x,) if fn.__code__.co_argcount == 1 else (x, make_dtensor(other, mesh, [Replicate()]))
        assert_spmd_equal(fn, *args, backward=name != "to_int", atol=1e-5)
    return True


@settings(max_examples=6)
@given(world=st.sampled_from([2, 3]), rows=st.sampled_from([1, 5, 7]),
       names=st.lists(st.sampled_from(sorted(_OPS)), min_size=6, max_size=6, unique=True))
def test_ops_on_product_partials_equal_one_device(world, rows, names):
    assert run_on_ranks(world, _ops_on_product, world, names, rows) == [True] * world


def test_every_op_once():
    names = sorted(_OPS)
    assert run_on_ranks(2, _ops_on_product, 2, names, 5) == [True, True]

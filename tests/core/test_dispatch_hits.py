"""A cache hit behaves as the miss that made its cache entry: dispatch settles per key, at the miss, what every
hit runs (dispatch._entry), and a plan that only runs the local op takes a short path (Plan.direct_run). Each
check runs its ops several times, so the later rounds are hits, and compares every round with one device."""

import pytest
import torch
import torch.nn.functional as F

import dtensor_plus as dtp
from dtensor_plus import Replicate, Shard, comm_mode, dispatch, rules
from dtensor_plus.declared import AllReduce
from dtensor_plus.dtensor import DTensor
from dtensor_plus.explicit import ImplicitCommunicationError, explicit_communication
from dtensor_plus.rules import Sharding
from dtensor_plus.testing import run_on_ranks

_ROUNDS = 3


def _whole(*shape):
    return torch.arange(float(torch.Size(shape).numel())).reshape(shape) / 7.0


def _ops(t, other):
    """Local-only ops on a row-sharded t (pointwise, view, reshape with a local shape argument, in place, several
    outputs, a view of a view), then writes into a view whose blocks are not views (write-through)."""
    y = (t + other) * 0.5
    y.mul_(2.0)
    flat = y.view(-1).reshape(3, -1)  # (reshape may copy, on one device too: taken after the write)
    out, mean, rstd = torch.ops.aten.native_layer_norm.default(y, [6], None, None, 1e-5)
    d = t.diagonal()  # row-sharded: a Partial whose blocks are not views of t's blocks
    d.mul_(3.0)  # written through into t
    d.view(-1).add_(1.0)  # a view of that view: written through too
    d = d.clone()  # (such a view does not follow later writes into its base: kept as it is now)
    column = t[2:6, 0]  # rows 2-5 split 2/2 but held 1/3: gathered (Replicate), not a view of t's blocks
    column.mul_(5.0)  # an in-place op that keeps its layout (the short path): still written through
    column.view(2, 2).add_(1.0)
    return [y, flat, out, mean, rstd, t, d, column]


def check_hits_equal_one_device():
    mesh = dtp.init_device_mesh("cpu", (2,))
    for round_ in range(_ROUNDS):
        before = dispatch.cache_info()
        x, o = _whole(6, 6), _whole(6, 6).flip(0)
        expected = _ops(x.clone(), o)
        got = _ops(dtp.distribute_tensor(x, mesh, [Shard(0)]), dtp.distribute_tensor(o, mesh, [Shard(0)]))
        for i, (g, e) in enumerate(zip(got, expected)):
            torch.testing.assert_close(g.full_tensor(), e, msg=f"round {round_}, output {i}")
        after = dispatch.cache_info()
        if round_:
            assert after["misses"] == before["misses"] and after["hits"] > before["hits"], (before, after)


def test_hits_equal_one_device():
    run_on_ranks(2, check_hits_equal_one_device)


def check_results_have_the_constructors_fields():
    mesh = dtp.init_device_mesh("cpu", (2,))
    x = dtp.distribute_tensor(_whole(4, 4), mesh, [Shard(0)])
    for _ in range(2):  # the miss, then a hit
        y = x + x
        made = DTensor(y._local_tensor, y._spec)
        assert type(y) is DTensor and set(vars(y)) == set(vars(made)), (vars(y), vars(made))
        assert (y.shape, y.stride(), y.dtype, y.device, y.layout, y.requires_grad) == \
               (made.shape, made.stride(), made.dtype, made.device, made.layout, made.requires_grad)
        assert y._spec is made._spec and y._created < made._created


def test_results_have_the_constructors_fields():
    run_on_ranks(2, check_results_have_the_constructors_fields)


def check_communicating_hits_are_counted_and_audited():
    mesh = dtp.init_device_mesh("cpu", (2,))
    rows = dtp.distribute_tensor(_whole(4, 4), mesh, [Shard(0)])
    cols = dtp.distribute_tensor(_whole(4, 4), mesh, [Shard(1)])
    with comm_mode() as counter:
        for _ in range(_ROUNDS):
            torch.testing.assert_close((rows + cols).full_tensor(), 2 * _whole(4, 4))
    ops = {op for op, _, _ in counter.by_op}
    assert torch.ops.aten.add.Tensor in ops, counter.by_op  # each hit's move is attributed to its op
    with explicit_communication():
        for _ in range(_ROUNDS):
            rows * 2.0  # local only: runs
            with pytest.raises(ImplicitCommunicationError):
                rows + cols  # a cached plan that moves an input still raises before any of it runs


def test_communicating_hits_are_counted_and_audited():
    run_on_ranks(2, check_communicating_hits_are_counted_and_audited)


def check_attention_draws_only_with_dropout():
    mesh = dtp.init_device_mesh("cpu", (2,))
    q_whole = _whole(2, 2, 4, 8).sin()
    q = dtp.distribute_tensor(q_whole, mesh, [Shard(0)])
    expected = F.scaled_dot_product_attention(q_whole, q_whole, q_whole)
    for _ in range(_ROUNDS):  # dropout_p=0: the local op alone, hit after hit
        torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q).full_tensor(), expected)
    # the same cache key (a float enters it as its type) with dropout: the seeded run, which draws
    dropped = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5).full_tensor()
    assert not torch.allclose(dropped, expected)


def test_attention_draws_only_with_dropout():
    run_on_ranks(2, check_attention_draws_only_with_dropout)


def check_outside_the_mesh_on_hits():
    sub = dtp.DeviceMesh("cpu", [0, 1])
    for _ in range(_ROUNDS):
        x = dtp.distribute_tensor(_whole(4, 4), sub, [Shard(0)])
        y = x + x
        if torch.distributed.get_rank() == 2:
            assert y._local_tensor.numel() == 0 and y.shape == (4, 4)
        else:
            torch.testing.assert_close(y.full_tensor(), 2 * _whole(4, 4))


def test_outside_the_mesh_on_hits():
    run_on_ranks(3, check_outside_the_mesh_on_hits)


def check_replicated_inplace_on_hits():
    mesh = dtp.init_device_mesh("cpu", (2,))
    x = dtp.distribute_tensor(_whole(3, 4), mesh, [Replicate()])
    for _ in range(_ROUNDS):
        assert x.add_(1.0) is x
    torch.testing.assert_close(x.full_tensor(), _whole(3, 4) + _ROUNDS)


def test_replicated_inplace_on_hits():
    run_on_ranks(2, check_replicated_inplace_on_hits)


def _sum_declaring_an_all_reduce_on_mesh_dim_1(op):
    def local_op(x, dtype=None, *, comm):
        return comm.all_reduce(x.sum(), "sum")

    whole = (Replicate(), Replicate())
    return Sharding(inputs=((Replicate(), Shard(0)),), outputs=(whole,), local_op=local_op,
                    communication=(AllReduce((1,), ("sum",)),))


def check_moves_and_declarations_that_cannot_act():
    """Hits whose communication cannot act: a redistribute of a DTensor that needs no gradient (no autograd node,
    its moved spec the same object each time, so the next op's key meets it by identity), and a rule's declared
    all-reduce on a mesh dim of one rank (it issues nothing, and the hit takes the short path), which explicit
    mode still audits as everywhere else."""
    mesh = dtp.init_device_mesh("cpu", (2, 1))
    x = dtp.distribute_tensor(_whole(5, 3), mesh, [Shard(0), Replicate()])
    specs = set()
    for _ in range(_ROUNDS):
        y = x.redistribute(placements=[Replicate(), Shard(1)])
        torch.testing.assert_close(y.full_tensor(), _whole(5, 3))
        assert y.grad_fn is None and not y.requires_grad
        specs.add(id(y._spec))
    assert len(specs) == 1, specs
    equal = dtp.init_device_mesh("cpu", (2, 1))  # an equal mesh, another object (as a simulated world's would be)
    moved = dtp.distribute_tensor(_whole(5, 3), equal, [Shard(0), Replicate()]).redistribute(placements=[Replicate(), Shard(1)])
    assert equal is not mesh and moved._spec.mesh is equal  # never the cached spec's mesh
    w = dtp.distribute_tensor(_whole(5, 3), mesh, [Shard(0), Replicate()]).requires_grad_()
    w.redistribute(placements=[Replicate(), Replicate()]).sum().backward()  # needs a gradient: the autograd Function
    torch.testing.assert_close(w.grad.full_tensor(), torch.ones(5, 3))

    v = dtp.distribute_tensor(torch.arange(7.0), mesh, [Replicate(), Shard(0)])
    with rules.override_rule({torch.ops.aten.sum.default: _sum_declaring_an_all_reduce_on_mesh_dim_1}):
        for _ in range(_ROUNDS):
            with comm_mode() as counter:
                total = v.sum()
            assert counter.count() == 0 and total.full_tensor().item() == 21.0, counter.by_op
            with explicit_communication(), pytest.raises(ImplicitCommunicationError):
                v.sum()  # declared, not asked for: raises though it would issue nothing, as on more ranks


def test_moves_and_declarations_that_cannot_act():
    run_on_ranks(2, check_moves_and_declarations_that_cannot_act)

"""Dispatch: caching, in-place and out= ops, scalars and 0-d tensors, fallback, and errors for bad mixes."""

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dtensor_plus import Partial, Replicate, Shard, comm_mode, distribute_tensor, init_device_mesh
from dtensor_plus import dispatch
from dtensor_plus.testing import RankError, run_on_ranks
from dtensor_plus.testing.strategies import layouts, make_dtensor


def _whole(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _cache_hits():
    mesh = init_device_mesh("cpu", (2,))
    x = distribute_tensor(_whole((4, 4), 0), mesh, [Shard(0)])
    x + 1.0
    before = dispatch.cache_info()
    for step in range(5):
        x + float(step)  # a changing float never makes a new cache entry
    after = dispatch.cache_info()
    return after["hits"] - before["hits"], after["size"] - before["size"]


def test_cache_hits_and_floats_stay_out_of_the_key():
    assert run_on_ranks(2, _cache_hits)[0] == (5, 0)


_OPS = {
    "add_scalar": lambda x: x + 2.5,
    "mul": lambda x: x * x,
    "exp": lambda x: x.exp(),
    "sub_rev": lambda x: 1.0 - x,
    "neg": lambda x: -x,
}


def _interleaved(steps):
    mesh = init_device_mesh("cpu", steps[0][0])
    for mesh_shape, shape, placements, op, seed in steps:
        whole = _whole(shape, seed)
        x = make_dtensor(whole, mesh, placements)
        torch.testing.assert_close(_OPS[op](x).full_tensor(), _OPS[op](whole), rtol=1e-5, atol=1e-5)


@settings(max_examples=100)
@given(data=st.data())
def test_cache_never_serves_a_stale_result(data):
    mesh_shape, *_ = data.draw(layouts(4))
    steps = []
    for _ in range(data.draw(st.integers(2, 5))):
        _, shape, placements = data.draw(layouts(4, partial=True).filter(lambda lay: lay[0] == mesh_shape))
        steps.append((mesh_shape, shape, placements, data.draw(st.sampled_from(sorted(_OPS))), data.draw(st.integers(0, 99))))
    run_on_ranks(4, _interleaved, steps)


def _inplace_cases():
    mesh = init_device_mesh("cpu", (2,))
    a, b = _whole((5, 3), 1), _whole((5, 3), 2)
    x = distribute_tensor(a, mesh, [Shard(0)])
    x.add_(distribute_tensor(b, mesh, [Replicate()]))  # the other operand follows self
    assert x.placements == (Shard(0),) and torch.allclose(x.full_tensor(), a + b)
    r = distribute_tensor(a, mesh, [Replicate()])
    r.add_(make_dtensor(b, mesh, [Partial()]))  # a Partial operand is reduced into a Replicate self
    assert r.placements == (Replicate(),) and torch.allclose(r.full_tensor(), a + b)
    p = make_dtensor(a, mesh, [Partial()])
    p.mul_(3.0)  # linear: stays Partial without communication
    assert p.placements == (Partial(),) and torch.allclose(p.full_tensor(), a * 3)
    q = make_dtensor(a, mesh, [Partial()])
    q.exp_()  # non-linear on a Partial self: computed out of place and copied back in self's layout
    assert q.placements == (Partial(),) and torch.allclose(q.full_tensor(), a.exp())
    out = distribute_tensor(torch.zeros(5, 3), mesh, [Replicate()])
    res = torch.add(distribute_tensor(a, mesh, [Shard(0)]), distribute_tensor(b, mesh, [Shard(0)]), out=out)
    assert res is out and out.placements == (Replicate(),) and torch.allclose(out.full_tensor(), a + b)


def test_inplace_and_out_variants():
    run_on_ranks(2, _inplace_cases)


def _scalars_and_zero_d():
    mesh = init_device_mesh("cpu", (2,))
    x = distribute_tensor(_whole((4, 3), 3), mesh, [Shard(0)])
    s = x.sum()  # a 0-d DTensor
    y = x * torch.tensor(2.0) + s  # a plain 0-d tensor is a replicated scalar
    torch.testing.assert_close(y.full_tensor(), x.full_tensor() * 2 + x.full_tensor().sum())
    assert s.ndim == 0 and y.placements == (Shard(0),)
    rank_local = torch.full((4, 3), float(torch.distributed.get_rank()))
    try:
        x + rank_local
    except ValueError as e:
        return str(e)


def test_scalars_zero_d_and_plain_tensor_error():
    message = run_on_ranks(2, _scalars_and_zero_d)[0]
    assert "aten.add.Tensor" in message and "argument 1" in message and "distribute_tensor" in message
    assert "differ between ranks (rank 1 holds other values than rank 0)" in message


def _different_meshes():
    m1 = init_device_mesh("cpu", (2,))
    from dtensor_plus import DeviceMesh

    m2 = DeviceMesh("cpu", [[0, 1]])  # the same ranks as a 2-D mesh: another mesh
    a = distribute_tensor(torch.ones(2), m1, [Shard(0)])
    b = distribute_tensor(torch.ones(2), m2, [Shard(0), Shard(0)])
    with pytest.raises(ValueError, match="different meshes"):
        a + b


def test_different_meshes_raise():
    run_on_ranks(2, _different_meshes)


def _fallback():
    mesh = init_device_mesh("cpu", (2,))
    whole = _whole((7, 3), 4)
    x = distribute_tensor(whole, mesh, [Shard(0)])
    v = distribute_tensor(torch.tensor([[-0.5, 0.0, 0.5]]), mesh, [Replicate()])
    with warnings.catch_warnings(record=True) as caught, comm_mode() as comm:
        warnings.simplefilter("always")
        got = torch.block_diag(x, v)
        torch.block_diag(x, v)
    assert torch.equal(got.full_tensor(), torch.block_diag(whole, v.full_tensor()))
    named = [w for w in caught if "block_diag" in str(w.message)]
    return len(named), comm.fallbacks["aten.block_diag.default"]


def test_op_without_rule_falls_back_correctly_with_one_warning():
    assert run_on_ranks(2, _fallback)[0] == (1, 2)


def _raise_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("boom")


def test_a_failing_rank_is_named():
    with pytest.raises(RankError, match="rank 1"):
        run_on_ranks(2, _raise_on_rank_one)


def _inplace_without_functional_twin():
    mesh = init_device_mesh("cpu", (2,))
    p = make_dtensor(torch.arange(6).view(2, 3), mesh, [Partial()])
    p <<= 1  # aten.__ilshift__ has no functional twin: it runs on a replicated copy, copied back into self
    return p.placements, p.full_tensor()


def test_inplace_op_without_functional_twin_on_a_partial_self():
    for placements, value in run_on_ranks(2, _inplace_without_functional_twin):
        assert placements == (Partial(),) and torch.equal(value, torch.arange(6).view(2, 3) << 1)


def check_override_blocks_keep_their_plans():
    """An override block entered again with the same rules (loss_parallel every step) re-plans nothing, and
    the plans made outside it still serve outside it."""
    from dtensor_plus.layouts import loss_parallel
    import torch.nn.functional as F

    mesh = init_device_mesh("cpu", (2,))
    logits = make_dtensor(torch.randn(4, 6), mesh, [Shard(1)], requires_grad=True)
    target = make_dtensor(torch.tensor([0, 5, 2, 3]), mesh, [Replicate()])
    misses = []
    for _ in range(3):
        with loss_parallel():
            F.cross_entropy(logits, target).backward()
        (logits.grad * 2).sum()
        misses.append(dispatch.cache_info()["misses"])
    return misses


def test_override_blocks_keep_their_plans():
    misses = run_on_ranks(2, check_override_blocks_keep_their_plans)[0]
    assert misses[1] == misses[2], misses  # (step 2 plans the gradient accumulation's add once)


def check_implicit_replication():
    """Inside implicit_replication() a plain tensor meeting DTensors is Replicate with no check (no
    collective); outside it, it joins after a cross-rank check of its values (one counted all-gather per mesh
    dim, a one-time warning), and a tensor that differs between ranks raises on every rank."""
    from dtensor_plus import implicit_replication

    mesh = init_device_mesh("cpu", (2, 2))
    whole, plain = _whole((4, 3), 0), _whole((3,), 1)
    x = distribute_tensor(whole, mesh, [Shard(0), Shard(1)])
    with implicit_replication(), comm_mode() as comm:
        out = x * plain + torch.zeros(4, 3)
    assert out.placements == (Shard(0), Shard(1)) and comm.count() == 0
    torch.testing.assert_close(out.full_tensor(), whole * plain)
    with warnings.catch_warnings(record=True) as caught, comm_mode() as comm:
        warnings.simplefilter("always")
        checked = x * plain
        x * plain
    torch.testing.assert_close(checked.full_tensor(), whole * plain)
    assert comm.count("all_gather") == 4  # two mesh dims, two calls: the check is never skipped
    assert sum("cross-rank check" in str(w.message) for w in caught) == 1  # once per op
    rank = torch.distributed.get_rank()
    local = plain + (rank == 3)  # only the last rank differs: every rank must still raise
    with pytest.raises(ValueError, match=r"differ between ranks \(rank 3 holds"):
        x * local


def test_implicit_replication():
    run_on_ranks(4, check_implicit_replication)


def check_torch_made_plain_tensors():
    """Plain tensors that torch itself builds from global metadata join as Replicate: a Python list index
    (x[[2, 0]]), and the zeros/arange autograd's formulas create in backward (cummax, trace, prod)."""
    from dtensor_plus.testing import assert_spmd_equal

    mesh = init_device_mesh("cpu", (3,))
    for placement in (Shard(0), Shard(1), Replicate()):
        x = distribute_tensor(_whole((5, 4), 0), mesh, [placement]).requires_grad_()
        assert_spmd_equal(lambda t: t[[2, 0, 2]], x)
        assert_spmd_equal(lambda t: t[:, [3, 1]], x)
        assert_spmd_equal(lambda t: torch.cummax(t, 1).values, x)
        assert_spmd_equal(torch.trace, x)
        assert_spmd_equal(lambda t: torch.prod(t, 0), x)
    index = torch.tensor([0, 1])  # a plain index tensor joins once all ranks are seen to hold the same one
    torch.testing.assert_close(x[index].full_tensor(), x.full_tensor()[index])
    with pytest.raises(ValueError, match="differ between ranks"):  # a rank-local one never passes
        x[index + torch.distributed.get_rank() % 2]


def test_torch_made_plain_tensors():
    run_on_ranks(3, check_torch_made_plain_tensors)


def _inplace_by_functional_rule():
    mesh = init_device_mesh("cpu", (2,))
    results = {}
    cases = {"abs_": lambda t: t.abs_(), "mish_": lambda t: torch.nn.functional.mish(t, inplace=True),
             "heaviside_": lambda t: t.heaviside_(torch.full_like(t, 0.5)),
             "renorm_": lambda t: t.renorm_(2.0, 1, 1.0)}  # renorm's rule has a local op and a declared all-reduce
    for name, fn in cases.items():
        full = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
        x = distribute_tensor(full.clone(), mesh, [Shard(0)])
        with warnings.catch_warnings(record=True) as caught, comm_mode() as comm:
            warnings.simplefilter("always")
            out = fn(x)
        expected = fn(full.clone())
        results[name] = (out is x, x.placements == (Shard(0),), float((x.full_tensor() - expected).abs().max()),
                         [str(w.message) for w in caught if "sharding rule" in str(w.message)], dict(comm.fallbacks))
    return results


def test_inplace_ops_without_a_rule_are_decided_by_their_functional_twin():
    for name, (same, kept, diff, warned, fallbacks) in run_on_ranks(2, _inplace_by_functional_rule)[0].items():
        assert same and kept and diff < 1e-6, (name, same, kept, diff)
        assert not warned and not fallbacks, (name, warned, fallbacks)  # nothing gathered, nothing to warn about

"""loss_parallel (layouts/loss.py): F.cross_entropy on vocab-sharded logits equals one device, forward and
backward, for tp = 2, 3, 4 and a (dp, tp) = (2, 2) mesh, with uneven and empty vocab shards; the logits are
never gathered (only (N, 1) all-reduces, counted exactly); outside the block the default rules still give
the right answer, and leaving the block restores them.

Legend: N rows (B*T), V vocabulary, n ranks on the tp mesh dim.
"""

import pytest
import torch
import torch.nn.functional as F

from dtensor_plus import Partial, Replicate, Shard, comm_mode, init_device_mesh
from dtensor_plus.layouts.loss import loss_parallel
from dtensor_plus.rules import rule_for
from dtensor_plus.testing import assert_spmd_equal, run_on_ranks
from dtensor_plus.testing.rules import decide
from dtensor_plus.testing.strategies import make_dtensor

aten = torch.ops.aten
R = Replicate()
_OPS = (aten._log_softmax.default, aten._log_softmax_backward_data.default,
        aten.nll_loss_forward.default, aten.nll_loss_backward.default)
_TOL = dict(atol=1e-10, rtol=1e-10)


def _data(num_rows, vocab, seed, ignore_index=-100, use_weight=False):
    g = torch.Generator().manual_seed(seed)
    logits_NV = torch.randn(num_rows, vocab, generator=g, dtype=torch.float64) * 3
    target_N = torch.randint(0, vocab, (num_rows,), generator=g)
    ignored = torch.rand(num_rows, generator=g) < 0.3
    target_N = torch.where(ignored, ignore_index, target_N)
    weight_V = torch.rand(vocab, generator=g, dtype=torch.float64) + 0.1 if use_weight else None
    return logits_NV, target_N, weight_V


def _cross_entropy(logits, target, weight=None, **kwargs):
    with loss_parallel():
        return F.cross_entropy(logits, target, weight, **kwargs)


def _counted_step(dx, *args, **kwargs):
    """Collectives of one forward and backward (assert_spmd_equal's own full_tensor() calls gather)."""
    dx = dx.detach().requires_grad_(True)
    with comm_mode() as comm, loss_parallel():
        F.cross_entropy(dx, *args, **kwargs).sum().backward()
    return comm


def _loss_fallbacks(comm):
    return [op for op in comm.fallbacks if "softmax" in op or "nll" in op]


# ---------------------------------------------------------------- rules, no ranks


def test_context_installs_and_restores_rules():
    defaults = [rule_for(op) for op in _OPS]
    with loss_parallel():
        inside = [rule_for(op) for op in _OPS]
        with loss_parallel():  # nests
            assert [rule_for(op) for op in _OPS] != defaults
        assert [rule_for(op) for op in _OPS] == inside
    assert all(a is not b for a, b in zip(inside, defaults))
    assert [rule_for(op) for op in _OPS] == defaults


def test_rule_layouts():
    x = ((6, 5), (Shard(0), Shard(1)))
    with loss_parallel():
        assert decide(aten._log_softmax.default, x, 1, False, mesh_shape=(2, 2))[1] == ((Shard(0), Shard(1)),)
        ins, outs = decide(aten.nll_loss_forward.default, x, ((6,), (Shard(0), R), torch.int64), None, 2, -100,
                           mesh_shape=(2, 2))
        assert ins == [(Shard(0), Shard(1)), (Shard(0), R)] and outs == ((Partial(), Partial()), (Partial(), R))
        ins, outs = decide(aten.nll_loss_forward.default, ((6, 5), (Shard(1),)), ((6,), (R,), torch.int64),
                           None, 0, -100)
        assert outs == ((Partial(),), (R,))
        # class dim not sharded: the default rule decides
        assert decide(aten._log_softmax.default, ((6, 5), (Shard(0),)), 1, False)[1] == ((Shard(0),),)
    # outside: the default makes the class dim whole
    assert decide(aten._log_softmax.default, x, 1, False, mesh_shape=(2, 2))[1] == ((Shard(0), R),)


# ---------------------------------------------------------------- equal to one device


_CASES = [  # (N, V, reduction, ignore_index, use_weight)
    (6, 7, "mean", -100, False),
    (6, 7, "sum", -100, True),
    (6, 7, "none", -100, False),
    (5, 5, "mean", 2, True),  # a real class ignored
    (5, 3, "mean", -100, False),  # V < n on 4 ranks: an empty vocab shard
    (4, 3, "none", -100, True),
    (4, 3, "sum", 0, False),
]


def check_tp(world_size):
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    for seed, (num_rows, vocab, reduction, ignore_index, use_weight) in enumerate(_CASES):
        logits, target, weight = _data(num_rows, vocab, seed, ignore_index, use_weight)
        dx = make_dtensor(logits, mesh, [Shard(-1)], requires_grad=True)
        dt = make_dtensor(target, mesh, [R])
        dw = make_dtensor(weight, mesh, [R]) if use_weight else None
        out = assert_spmd_equal(_cross_entropy, dx, dt, dw, reduction=reduction, ignore_index=ignore_index, **_TOL)
        comm = _counted_step(dx, dt, dw, reduction=reduction, ignore_index=ignore_index)
        assert comm.count("all_gather") == 0, comm  # neither logits nor grads gathered
        assert not _loss_fallbacks(comm), comm
        assert out.placements == (Partial(),)  # summed over the vocab shards, reduced only when read


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_cross_entropy_matches_one_device_on_tp(world_size):
    run_on_ranks(world_size, check_tp, world_size)


def check_dp_tp(num_batch, use_weight):
    """(B, T, V) logits of a colwise lm head, batch on dp and vocab on tp, flattened to (B*T, V)."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    seq, vocab = 3, 13  # 13 on tp=2: uneven vocab shards
    for seed, (reduction, smoothing) in enumerate([("mean", 0.0), ("sum", 0.0), ("none", 0.0), ("mean", 0.1)]):
        logits, target, weight = _data(num_batch * seq, vocab, seed, -100, use_weight)
        dx = make_dtensor(logits.view(num_batch, seq, vocab), mesh, [Shard(0), Shard(-1)], requires_grad=True)
        dt = make_dtensor(target.view(num_batch, seq), mesh, [Shard(0), R])
        dw = make_dtensor(weight, mesh, [R, R]) if use_weight else None

        def loss(x_BTV, t_BT, w):
            return _cross_entropy(x_BTV.flatten(0, 1), t_BT.flatten(0, 1), w, reduction=reduction,
                                  label_smoothing=smoothing)

        assert_spmd_equal(loss, dx, dt, dw, **_TOL)
        comm = _counted_step(dx.flatten(0, 1), dt.flatten(0, 1), dw, reduction=reduction, label_smoothing=smoothing)
        assert comm.count("all_gather", "tp") == 0, comm
        # O(N), not O(N·V): (N, 1) float64 all-reduces (one more for smoothing's class sum), N target ints on dp
        assert comm.bytes() <= 6 * 8 * num_batch * seq < 8 * num_batch * seq * vocab, comm
        assert not _loss_fallbacks(comm), comm


@pytest.mark.parametrize("num_batch,use_weight", [(4, False), (3, True)])  # 3 rows: uneven dp shards
def test_cross_entropy_matches_one_device_on_dp_tp(num_batch, use_weight):
    run_on_ranks(4, check_dp_tp, num_batch, use_weight)


# ---------------------------------------------------------------- communication


def check_collectives(world_size, num_rows, vocab):
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    logits, target, _ = _data(num_rows, vocab, 0)
    dx = make_dtensor(logits, mesh, [Shard(1)], requires_grad=True)
    dt = make_dtensor(target, mesh, [R])
    with comm_mode() as forward:
        loss = _cross_entropy(dx, dt, reduction="sum")
    with comm_mode() as backward:
        with loss_parallel():
            loss.backward()
    grad_ok = torch.allclose(dx.grad.full_tensor(), _single_grad(logits, target), **_TOL)
    return (forward.count("all_reduce"), forward.bytes("all_reduce"), forward.count(),
            backward.count("all_reduce"), backward.bytes("all_reduce"), dx.grad.placements, grad_ok)


def _single_grad(logits, target):
    x = logits.clone().requires_grad_(True)
    F.cross_entropy(x, target, reduction="sum").backward()
    return x.grad


@pytest.mark.parametrize("world_size,num_rows,vocab", [(2, 8, 64), (4, 6, 3)])
def test_only_row_statistics_are_reduced(world_size, num_rows, vocab):
    fwd_n, fwd_bytes, fwd_total, bwd_n, bwd_bytes, grad_placements, grad_ok = run_on_ranks(
        world_size, check_collectives, world_size, num_rows, vocab)[0]
    row_stat = 2 * (world_size - 1) * num_rows * 8 // world_size  # ring all-reduce of (N, 1) float64
    assert (fwd_n, fwd_bytes, fwd_total) == (2, 2 * row_stat, 2)  # max and sum-exp; nothing else
    # backward: the grad sum of log_softmax's backward; the scalar loss grad is a Replicate constant
    assert (bwd_n, bwd_bytes) == (1, row_stat)
    assert grad_placements == (Shard(1),) and grad_ok


def check_dp_tp_collectives():
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    logits, target, _ = _data(8, 16, 0)
    dx = make_dtensor(logits, mesh, [Shard(0), Shard(1)], requires_grad=True)
    dt = make_dtensor(target, mesh, [Shard(0), R])
    counts = {}
    for reduction in ("mean", "sum", "none"):
        comm = _counted_step(dx, dt, reduction=reduction)
        counts[reduction] = dict(comm.counts), dict(comm.sent_bytes)
    return counts


def test_dp_tp_collectives():
    counts = run_on_ranks(4, check_dp_tp_collectives)[0]
    # 4 local rows: each (4, 1) float64 all-reduce on tp=2 sends 2·(1/2)·32 B; forward max + sum-exp, backward sum
    tp_stats = {("all_reduce", "tp"): 3}, {("all_reduce", "tp"): 96}
    assert counts["sum"] == counts["none"] == tp_stats
    # mean also all-reduces the local total weight (one float64) on dp for the global count: 2·(1/2)·8 B
    assert counts["mean"] == ({**tp_stats[0], ("all_reduce", "dp"): 1}, {**tp_stats[1], ("all_reduce", "dp"): 8})


def check_default_rules(world_size):
    mesh = init_device_mesh("cpu", (world_size,))
    logits, target, _ = _data(5, 7, 3)
    dx = make_dtensor(logits, mesh, [Shard(1)], requires_grad=True)
    dt = make_dtensor(target, mesh, [R])
    with comm_mode() as comm:
        assert_spmd_equal(F.cross_entropy, dx, dt, **_TOL)
    return comm.count("all_gather")


def test_outside_the_context_the_default_rules_gather():
    assert run_on_ranks(3, check_default_rules, 3)[0] >= 1

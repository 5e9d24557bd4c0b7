"""Rank divergence, with and without ``check_divergence``:

- checked, two ranks running one op on swapped arguments of equal specs (``a @ b`` here, ``b @ a`` there) are told
  apart by the order the inputs were made in, on every rank, while an extra local op on one rank is no divergence;
- unchecked, ranks that issue different collectives fail at the timeout with an error naming each rank's collective
  and op, and pointing to ``check_divergence`` (not "every rank reported in").
"""

import os

import pytest
import torch

import dtensor_plus as dtp
from dtensor_plus import Partial, Shard
from dtensor_plus.debug import RankDivergenceError
from dtensor_plus.testing import run_on_ranks, shutdown_pools


def _swapped_arguments(rows, check, extra_local_op):
    mesh = dtp.init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    a = dtp.distribute_tensor(torch.randn(rows, rows), mesh, [Shard(0)])
    b = dtp.distribute_tensor(torch.randn(rows, rows), mesh, [Shard(0)])
    rank = mesh.get_rank()
    if extra_local_op and rank == 0:
        a * 2  # makes a DTensor on rank 0 only (no communication): the inputs' order is unchanged
    with dtp.check_divergence(check):
        try:
            out = a @ b if rank == 0 or extra_local_op else b @ a
            return "ran", torch.allclose(out.full_tensor(), a.full_tensor() @ b.full_tensor())
        except RankDivergenceError as error:
            return "diverged", str(error)


@pytest.mark.parametrize("rows", [5, 1])  # 5 rows on 2 ranks: uneven; 1 row: rank 1's shards are empty
def test_swapped_arguments_are_told_apart(rows):
    spec = f"({rows}, {rows}) torch.float32 [Shard(dim=0)]"
    for kind, message in run_on_ranks(2, _swapped_arguments, rows, True, False):
        assert kind == "diverged", message
        assert f"aten.mm.default(#1 {spec}, #2 {spec})" in message  # rank 0: a @ b
        assert f"aten.mm.default(#2 {spec}, #1 {spec})" in message  # rank 1: b @ a


def test_unchecked_swapped_arguments_pair_silently():
    """Why the check must tell them apart: unchecked, the two gathers pair and rank 1's product is wrong."""
    (kind0, right0), (kind1, right1) = run_on_ranks(2, _swapped_arguments, 5, False, False)
    assert kind0 == kind1 == "ran" and not (right0 and right1)


def test_a_local_op_on_one_rank_is_no_divergence():
    assert run_on_ranks(2, _swapped_arguments, 5, True, True) == [("ran", True)] * 2


def _different_collectives():
    """Unchecked, 2 s timeout: rank 0 gathers x for cumsum while rank 1 all-reduces y for an add."""
    os.environ.update(DTENSOR_PLUS_TIMEOUT_S="2", DTENSOR_PLUS_REPORT_WAIT_S="2")
    try:
        mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
        x = dtp.distribute_tensor(torch.randn(6, 3), mesh, [Shard(0)], src_data_rank=None)
        y = dtp.DTensor.from_local(torch.ones(5), mesh, [Partial()])
        try:
            out = torch.cumsum(x, 0) if mesh.get_rank() == 0 else y + 1
            return f"ran: {out.placements}"
        except RuntimeError as error:
            return str(error)
    finally:
        for key in ("DTENSOR_PLUS_TIMEOUT_S", "DTENSOR_PLUS_REPORT_WAIT_S"):
            del os.environ[key]


def test_unchecked_divergence_names_each_ranks_op_and_the_check():
    try:
        messages = run_on_ranks(2, _different_collectives)
    finally:
        shutdown_pools()  # the group is left with unmatched collectives
    for message in messages:
        assert "every rank of the group is alive but the ranks diverged" in message, message
        assert "rank 0 at all_gather on mesh dim 'dp'" in message
        assert "in aten.cumsum.default((6, 3) torch.float32 [Shard(dim=0)])" in message
        assert "rank 1 at all_reduce on mesh dim 'dp'" in message
        assert "in aten.add.Tensor(" in message
        assert "rerun under `with dtensor_plus.debug.check_divergence():`" in message
        assert "reported in" not in message

"""The divergence-checking debug mode and the report of a failed collective: ranks that take different paths
are named on every rank instead of pairing unrelated collectives; a dead rank is named by the survivors."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import dtensor_plus as dtp
from dtensor_plus import Replicate, Shard
from dtensor_plus.debug import RankDivergenceError
from dtensor_plus.testing import run_on_ranks


def _diverging_program(check: bool):
    mesh = dtp.init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    x = dtp.distribute_tensor(torch.randn(6, 3), mesh, [Shard(0)])
    rank = torch.distributed.get_rank()
    with dtp.check_divergence(check):
        try:
            # Both paths gather x once, with equal sizes: without the check they would pair silently.
            out = torch.cumsum(x, 0) if rank == 0 else torch.sort(x, 0).values
            return "ran", out.full_tensor().shape
        except RankDivergenceError as error:
            return "diverged", str(error)


def test_divergence_is_named_on_every_rank():
    results = run_on_ranks(2, _diverging_program, True)
    for kind, message in results:
        assert kind == "diverged"
        assert "rank 1 is not at the collective rank 0 is at" in message
        assert "aten.cumsum.default((6, 3) torch.float32 [Shard(dim=0)])" in message
        assert "aten.sort.default((6, 3) torch.float32 [Shard(dim=0)])" in message


def test_unchecked_divergence_pairs_silently():
    """What the mode exists for: the same program without it runs with no error at all."""
    assert [kind for kind, _ in run_on_ranks(2, _diverging_program, False)] == ["ran", "ran"]


def _same_program():
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    w = torch.randn(4, 6, requires_grad=True)
    x = torch.randn(8, 4)
    dw = dtp.distribute_tensor(w.detach(), mesh, [Replicate(), Shard(1)]).requires_grad_()
    dx = dtp.distribute_tensor(x, mesh, [Shard(0), Replicate()])
    with dtp.comm_mode() as unchecked:
        (dx @ dw).relu().sum().backward()
        grad = dw.grad.full_tensor()
    dw.grad = None
    with dtp.check_divergence(), dtp.comm_mode() as checked:
        (dx @ dw).relu().sum().backward()
        assert torch.equal(dw.grad.full_tensor(), grad)
    return unchecked.count(), checked.count()


def test_checking_a_correct_program_changes_nothing():
    for unchecked, checked in run_on_ranks(4, _same_program):
        assert unchecked == checked > 0  # the check's own gathers are not counted as the program's


_DEAD_PEER_PROGRAM = textwrap.dedent("""
    import os, sys, torch
    import dtensor_plus as dtp
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    x = dtp.DTensor.from_local(torch.ones(4), mesh, [dtp.Partial()])
    if mesh.get_rank() == 1:
        os._exit(3)  # dies in the middle of the step, before the all-reduce
    try:
        x.full_tensor()
    except RuntimeError as error:
        print("ERROR:", error, flush=True)
        sys.exit(1)
""")


def test_survivors_name_the_dead_rank(tmp_path):
    script = tmp_path / "dead_peer.py"
    script.write_text(_DEAD_PEER_PROGRAM)
    port = 29500 + os.getpid() % 2000
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1",
               DTENSOR_PLUS_TIMEOUT_S="30", DTENSOR_PLUS_REPORT_WAIT_S="1")
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(script)], env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        out0, _ = procs[0].communicate(timeout=60)
        procs[1].wait(timeout=10)
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == 3
    assert procs[0].returncode == 1, out0
    assert "all_reduce on mesh dim 'dp' (ranks [0, 1]) failed on rank 0" in out0
    assert "ranks [1] of the group did not report in" in out0
    assert time.monotonic() - start < 45  # well within the collective timeout, no hang

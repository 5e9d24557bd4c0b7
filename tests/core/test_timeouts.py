"""Timeouts: every process group a mesh uses (mesh dims, flattened meshes, pipeline p2p groups) honours
DTENSOR_PLUS_TIMEOUT_S, so one stuck rank on a 2-D mesh fails its peers within it (not torch's 30 minutes); when
the rank hosting the job's store dies, survivors say so instead of blaming every rank, themselves included.

Fault tests leave broken groups behind in the rank processes, so they shut the pool down when done.
"""

import os
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import pytest
import torch

import dtensor_plus as dtp
from dtensor_plus import mesh as mesh_module
from dtensor_plus import point_to_point
from dtensor_plus.testing import run_on_ranks, shutdown_pools


def _timeouts_of_every_group(seconds):
    """The timeouts of this rank's groups: 2x2 mesh dims, a flattened (b, c) slice of a (2, 1, 2) mesh (its own
    groups) and the pipeline's p2p group; with DTENSOR_PLUS_TIMEOUT_S set, then unset again."""
    os.environ["DTENSOR_PLUS_TIMEOUT_S"] = str(seconds)
    try:
        configured = _group_timeouts()
    finally:
        del os.environ["DTENSOR_PLUS_TIMEOUT_S"]
    return configured, _group_timeouts(), mesh_module.collective_timeout()


def _group_timeouts():
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    three = dtp.init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("a", "b", "c"))
    flat = three["b", "c"].flatten()
    groups = [mesh.get_group("dp"), mesh.get_group("tp"), flat.get_group(0), three.get_group("a"),
              point_to_point.p2p_group(mesh, "dp")]
    return [mesh_module._timeout_of(g, "gloo") for g in groups]


def test_every_group_of_a_mesh_takes_the_configured_timeout():
    for configured, default, fallback in run_on_ranks(4, _timeouts_of_every_group, 7.5):
        assert configured == [timedelta(seconds=7.5)] * 5
        # unset again: every group goes back to the default group's timeout (the pool's, 60 s or more)
        assert default == [fallback] * 5 and fallback >= timedelta(seconds=60)


def _bad_timeout_setting():
    os.environ["DTENSOR_PLUS_TIMEOUT_S"] = "ten"
    try:
        with pytest.raises(ValueError, match=r"DTENSOR_PLUS_TIMEOUT_S='ten' must be a positive number of seconds"):
            dtp.init_device_mesh("cpu", (2,))
    finally:
        del os.environ["DTENSOR_PLUS_TIMEOUT_S"]


def test_a_bad_timeout_setting_is_named():
    run_on_ranks(2, _bad_timeout_setting)


def _one_rank_stops(stuck_rank):
    """2x2 (dp, tp) mesh, 2 s timeout: ``stuck_rank`` skips the tp all-reduce its peer runs."""
    os.environ.update(DTENSOR_PLUS_TIMEOUT_S="2", DTENSOR_PLUS_REPORT_WAIT_S="1")
    try:
        mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        partial = dtp.DTensor.from_local(torch.ones(5), mesh["tp"], [dtp.Partial()])
        if mesh.get_rank() == stuck_rank:
            return None
        start = time.monotonic()
        try:
            partial.full_tensor()
        except RuntimeError as error:
            return time.monotonic() - start, str(error)
        return time.monotonic() - start, "ran"
    finally:
        for key in ("DTENSOR_PLUS_TIMEOUT_S", "DTENSOR_PLUS_REPORT_WAIT_S"):
            del os.environ[key]


def test_a_stuck_rank_on_a_2d_mesh_fails_its_peer_within_the_timeout():
    try:
        results = run_on_ranks(4, _one_rank_stops, 3)
    finally:
        shutdown_pools()
    assert results[3] is None
    for rank in (0, 1):  # the other tp group completes
        assert results[rank][1] == "ran"
    elapsed, message = results[2]
    assert elapsed < 15, elapsed  # 2 s timeout + 1 s for the report, on a loaded machine
    assert "all_reduce on mesh dim 'tp' (ranks [2, 3]) failed on rank 2" in message
    assert "ranks [3] of the group did not report in within 1 s" in message
    assert "rank 2 was at all_reduce on mesh dim 'tp'" in message


_STORE_HOST_DIES = textwrap.dedent("""
    import os, sys, torch
    import dtensor_plus as dtp
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    x = dtp.DTensor.from_local(torch.ones(4), mesh, [dtp.Partial()])
    torch.distributed.barrier()  # both are past the rendezvous: rank 1 fails in the step, not in starting up
    if mesh.get_rank() == 0:
        os._exit(3)  # rank 0 hosts the job's TCPStore: it dies in the middle of the step
    try:
        x.full_tensor()
    except RuntimeError as error:
        print("ERROR:", error, flush=True)
        sys.exit(1)
""")


def test_survivors_say_the_store_host_died_instead_of_blaming_everyone(tmp_path):
    script = tmp_path / "store_host_dies.py"
    script.write_text(_STORE_HOST_DIES)
    port = 31500 + os.getpid() % 2000
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1",
               DTENSOR_PLUS_TIMEOUT_S="20", DTENSOR_PLUS_REPORT_WAIT_S="1")
    procs = [subprocess.Popen([sys.executable, str(script)], env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        out1, _ = procs[1].communicate(timeout=90)
        procs[0].wait(timeout=10)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 3
    assert procs[1].returncode == 1, out1
    error = next((line for line in out1.splitlines() if line.startswith("ERROR:")), out1)
    assert "all_reduce on mesh dim 'dp' (ranks [0, 1]) failed on rank 1" in error
    assert f"the job's store at 127.0.0.1:{port} cannot be reached, so which ranks are alive is unknown" in error
    assert "did not report in" not in error  # neither rank 0 nor, least of all, rank 1 itself is blamed

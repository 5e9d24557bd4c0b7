"""A simulated rank does what the real rank does: on real gloo ranks and in a simulated world of the same size,
the same GPT step (tests/simulate/programs.py) issues the same collectives (kind, mesh dim, bytes, aten op,
module, forward/backward, in order), holds the same memory (parameters, gradients, optimizer state, and
the peak of the activations saved for backward) and computes the same FLOPs per local op, for every layout:
dp, ZeRO-1/2/3, tp, sp, cp, ep (under the routing the simulated world assumes, forced on the real routers) and
pp (every stage's rank, simulated in pp order)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from dtensor_plus.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parent))
import programs  # noqa: E402

TWO_RANKS = ["dp", "zero-3", "tp+sp", "cp-ring"]
TWO_RANKS_SLOW = ["zero-1", "zero-2", "tp", "cp-ulysses"]  # each shares its code path with one above
FOUR_RANKS = ["dp x tp+sp zero-3", "dp x tp zero-1"]


def _world(name: str) -> int:
    fields = programs.LAYOUTS[name][0]
    return fields.get("dp", 1) * fields.get("tp", 1) * fields.get("cp", 1)


def _in_order(step) -> list[tuple]:
    # The module of a backward collective is not compared: torch's ModuleTracker holds sibling modules whose
    # backward is running (attn.q, attn.k, attn.v) in a set, and which of them is "innermost" follows the
    # process's string hashing, so it differs between two real runs as well.
    return [(c.collective, c.mesh_dim, c.bytes, c.op, c.phase, c.module if c.phase == "forward" else None)
            for c in step.collectives]


def _check_equal(name: str, rank: int, simulated, measured) -> None:
    assert _in_order(simulated) == _in_order(measured), (name, rank)
    assert simulated.memory == measured.memory, (name, rank, simulated.memory, measured.memory)
    assert simulated.flops_by_op == measured.flops_by_op, (name, rank)
    assert simulated.collectives, "the step communicates: an empty record would prove nothing"
    assert simulated.memory["activations"] > 0 and simulated.flops > 0


@functools.cache
def _one_device_flops() -> int:
    return programs.simulated("one device", 1, 0).flops


def _check_layout(name: str) -> None:
    assert not dist.is_initialized(), "the simulation runs in this process: it must not be a rank already"
    world = _world(name)
    real = run_on_ranks(world, programs.measured, name, timeout=120)
    for rank in (0, world - 1):
        _check_equal(name, rank, programs.simulated(name, world, rank), real[rank])
    if "cp" not in name:
        # dp splits the rows and tp every matmul and the heads evenly: a real rank computes exactly its share of
        # the one-device step (causal ring attention does not split evenly over cp). This caught the FLOP count
        # taking the dispatcher's shape propagation (global shapes, on meta) for a rank's work.
        whole = _one_device_flops()
        assert [r.flops * world for r in real] == [whole] * world, (name, whole, [r.flops for r in real])


@pytest.mark.parametrize("name", TWO_RANKS)
def test_simulated_rank_equals_real_rank(name):
    _check_layout(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", TWO_RANKS_SLOW)
def test_simulated_rank_equals_real_rank_more_layouts(name):
    _check_layout(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", FOUR_RANKS)
def test_simulated_rank_equals_real_rank_on_a_2x2_mesh(name):
    _check_layout(name)


# -- the ranks that differ: pipeline stages, expert ranks ------------------------------------------------------


def _check_pipeline(name: str, pp: int, world: int) -> None:
    ranks = list(range(world))  # pp is the outer mesh dim: rank r is pp index r // (world // pp)
    simulated = programs.simulated_pipeline(name, pp, world, ranks)
    real = run_on_ranks(world, programs.measured_pipeline, name, pp, timeout=120)
    for rank in ranks:
        _check_equal(name, rank, simulated[rank], real[rank])
    sends = [simulated[r].bytes("send", "pp") for r in ranks]
    assert all(sends), ("every stage sends: activations forward, gradients back", sends)
    if programs.pipeline_ties(name, pp):
        tie_sums = [simulated[r].count("all_reduce", "pp") for r in ranks]
        assert tie_sums == [1] + [0] * (pp - 2) + [1], tie_sums  # the holders' sum, nothing on a middle rank


def test_simulated_pipeline_ranks_equal_real_ranks():
    # first, middle and last stage: three pp ranks, each simulated after the one feeding it (programs.Wire); the
    # head tied to the embedding: its gradient all-reduced over pp ranks 0 and 2 only (simulated_world's
    # pipeline_ties stands for the declarations the real ranks exchange)
    _check_pipeline("pp 1f1b tied", 3, 3)


def _check_expert_parallel(name: str) -> None:
    real = run_on_ranks(2, programs.measured, name, timeout=120)
    for rank in (0, 1):
        simulated = programs.simulated(name, 2, rank)
        _check_equal(name, rank, simulated, real[rank])
        assert simulated.count("all_to_all", "dp") > 0


@pytest.mark.slow
def test_simulated_pipeline_ranks_equal_real_ranks_with_dp_zero_bubble():
    # pp 2 x dp 2, ZeRO-1 inside each stage, the zero-bubble schedule (B and W apart): every rank of both stages
    _check_pipeline("pp x dp zero-1 zb_h1", 2, 4)


def test_simulated_expert_parallel_rank_equals_real_rank():
    # Routing follows values: the simulated world assumes a balanced one (expert_load="balanced"), and the real
    # ranks' routers are forced to it (programs.route_balanced), so the all-to-all splits are the same.
    _check_expert_parallel("ep")


@pytest.mark.slow
def test_simulated_expert_parallel_rank_equals_real_rank_under_a_skewed_load():
    # expert_load as a callable: every assignment to experts 0 and 1 (ep rank 0's), as real routers with a zero gate
    # route; rank 0 runs every row of both ranks and rank 1 none, so the ranks' activations and FLOPs differ
    _check_expert_parallel("ep, all tokens to experts 0 and 1")


@pytest.mark.parametrize("name", ["zero-3", "dp x tp+sp zero-3"])
def test_zero3_gradients_take_what_their_shards_take(name):
    # fp32 gradient shards are exactly as large as the fp32 parameter shards. With tp, the row-parallel weights'
    # gradients were views of the block's whole reduce-scatter output and kept all of it alive (816 floats held
    # for 336 used per debug block); the simulated rank holds what the real one holds (the tests above).
    memory = programs.simulated(name, _world(name), 0).memory
    assert memory["gradients"] == memory["parameters"], memory

"""Where a simulated world would need values other ranks hold, it runs on what it is told, and without that it
says what to tell it: the routing of a mixture of experts, the previous pipeline stage's header, the stages
holding a tied weight. (That the assumptions, when given, match real ranks exactly: test_exact.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import programs  # noqa: E402

from dtensor_plus.simulate import SimulationValueError, Wire, simulate_step, simulated_world  # noqa: E402


def _simulate_pipeline_rank(name, pp, world_size, rank, **assumed):
    with simulated_world(world_size, rank, **assumed) as world:
        one_step, stages, opts = programs.build_pipeline(name, pp)
        return simulate_step(world, one_step, models=stages, optimizers=opts)


def test_a_later_stage_simulated_before_its_sender_names_the_fix():
    ties = programs.pipeline_ties("pp 1f1b tied", 2)
    with pytest.raises(SimulationValueError, match=r"simulate rank 0 first, in a simulated_world\(\.\.\., wire=w\)"):
        _simulate_pipeline_rank("pp 1f1b tied", 2, 2, 1, wire=Wire(), pipeline_ties=ties)
    with pytest.raises(SimulationValueError, match="sharing one dtensor_plus.simulate.Wire"):
        _simulate_pipeline_rank("pp 1f1b tied", 2, 2, 1, pipeline_ties=ties)


def test_a_tied_weight_without_its_holders_names_the_fix():
    with pytest.raises(SimulationValueError, match=r"pipeline_ties=\{'tok_emb.weight'"):
        _simulate_pipeline_rank("pp 1f1b tied", 2, 2, 0)


def test_an_expert_load_that_does_not_add_up_is_refused():
    def lopsided(source, sources, assignments, experts):
        return [assignments] * experts

    with pytest.raises(ValueError, match="non-negative counts summing to"):
        with simulated_world(2, 0, expert_load=lopsided):
            one_step, model, opt = programs.build("ep")
            one_step()


def test_routing_that_drops_over_capacity_names_the_problem():
    programs.LAYOUTS["ep, capacity 1"] = (dict(dp=2), dict(moe_experts=4, moe_every=1, moe_capacity_factor=1.0))
    try:
        with pytest.raises(SimulationValueError, match="capacity"):
            programs.simulated("ep, capacity 1", 2, 0)
    finally:
        del programs.LAYOUTS["ep, capacity 1"]

"""The planner searches every schedule the executor runs, each priced by the schedule simulator with its memory:
with memory to spare it picks the zero-bubble V schedule (ZB-V), under a tight budget the V schedule that fits
(V-Half, then V-Min), each time the fastest layout that fits by the cost model's own figures
(examples/gpt.py's GPT, 8 layers, pp 4, 16 microbatches)."""

import pytest

from dtensor_plus.layouts.pipeline.registry import LOOPED as REGISTRY_LOOPED
from dtensor_plus.layouts.pipeline.registry import SCHEDULES as REGISTRY
from dtensor_plus.plan.cost import estimate, pipeline_time
from dtensor_plus.plan.hardware import Cluster, Link
from dtensor_plus.plan.layout import LOOPED, SCHEDULES, ParallelLayout
from dtensor_plus.plan.search import SearchSpace, search
from dtensor_plus.plan.workload import gpt_workload

GPT8 = gpt_workload(dict(name="tiny-8", num_layers=8, dim=64, num_heads=4, block_size=32, vocab_size=256))
NODE = Cluster("test", 8, 1e12, 2**30, Link(100e9, 0.0), Link(1e9, 0.0), 0.5)
BATCH = 16
PP_ONLY = SearchSpace(zero=(0,), micro_batch_sizes=(1,), recompute=("none",), offload=(False,),
                      sequence_parallel=(False,), virtual_stages=(2,), runnable=lambda layout: layout.pp == 4)


def test_the_planner_knows_every_schedule_the_executor_runs():
    assert set(SCHEDULES) == set(REGISTRY) == set(SearchSpace().schedules)
    assert set(LOOPED) == set(REGISTRY_LOOPED)


def _priced():
    out = {}
    for name in SCHEDULES:
        layout = ParallelLayout(pp=4, schedule=name, virtual_stages=2 if name in LOOPED else 1)
        out[name] = estimate(GPT8, layout, NODE, BATCH)
    return out


def _total(est):
    return sum(est.memory.values())


def test_v_schedule_when_memory_is_tight_zero_bubble_when_not():
    priced = _priced()
    # the simulator's own figures that make this the right answer: ZB-V fastest, V-Min and V-Half the least memory
    assert min(priced, key=lambda n: priced[n].step_time) == "zb_v"
    by_memory = sorted(priced, key=lambda n: _total(priced[n]))
    assert by_memory[:2] == ["v_min", "v_half"], by_memory
    assert priced["v_min"].bubble_s > priced["v_half"].bubble_s > priced["zb_v"].bubble_s
    budgets = {
        "zb_v": None,  # the cluster's 1 GiB: everything fits
        "v_half": (_total(priced["v_half"]) + min(_total(priced[n]) for n in by_memory[2:])) // 2,
        "v_min": (_total(priced["v_min"]) + _total(priced["v_half"])) // 2,
    }
    for want, budget in budgets.items():
        result = search(GPT8, 4, NODE, BATCH, memory_per_device=budget, space=PP_ONLY)
        winner = result.winner
        assert winner.layout.schedule == want, (budget, winner.layout)
        fitting = [n for n in priced if budget is None or _total(priced[n]) <= budget]
        assert winner.step_time == pytest.approx(min(priced[n].step_time for n in fitting))


@pytest.mark.parametrize("name, m", [("zb_v", 24), ("dualpipe_v", 24), ("v_half", 26), ("v_min", 26),
                                     ("breadth_first", 24), ("chimera", 24)])
def test_extrapolated_pipeline_time_is_the_simulated_step(name, m):
    """The cost model simulates two small microbatch counts and extends linearly: for these schedules that is
    the simulator's step at the real m exactly (stages F 1, B 2, W 1: 1/4 steps, no quantization; Chimera's
    stage s priced as model stage s % p, m a multiple of p: otherwise its 1F1B-merged order is priced by the
    list-scheduled one, equal only where F = BW), and the activations held are the generator's own peak."""
    from dtensor_plus.layouts.pipeline import Kind, simulate
    from dtensor_plus.layouts.pipeline.simulate import peak_until_w

    p, v = 4, 2 if name in LOOPED else 1
    split = name in ("zb_v", "dualpipe_v", "v_half", "v_min")
    forward, backward, weight = (1.0,) * p, ((2.0,) if split else (3.0,)) * p, ((1.0,) if split else (0.0,)) * p
    out = pipeline_time(name, p, m, v, forward, backward, weight, 0.0)
    schedule = REGISTRY[name](p, m, v) if name in LOOPED else REGISTRY[name](p, m)
    chunks = 1 if name == "chimera" else schedule.num_stages // p
    costs = {}
    for stage in range(schedule.num_stages):
        b, w = (2.0, 1.0) if split else (3.0, 0.0)
        costs.update({(Kind.F, stage): 1 / chunks, (Kind.B, stage): b / chunks, (Kind.W, stage): w / chunks,
                      (Kind.BW, stage): (b + w) / chunks})
    sim = simulate(schedule, costs)
    assert out["step_time"] == pytest.approx(sim.step_time, abs=1e-9)
    held = peak_until_w(schedule) if name in ("v_half", "v_min") else sim.peak_in_flight
    assert max(out["in_flight"]) == max(held)

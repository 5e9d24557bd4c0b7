"""search(): the best plan where it is obvious by construction, invariants of every answer, the families' reasons.

The cost model here is tests/plan/standin.py (analytic, its answers can be worked out by hand): the search is
judged on what it does with a cost model, not on the cost model (tests/plan/test_cost.py). Brute force over
the whole space is the oracle for the ranking on small worlds.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtensor_plus.plan.layout import ParallelLayout
from dtensor_plus.plan.search import SearchSpace, search

sys.path.insert(0, str(Path(__file__).resolve().parent))

import standin  # noqa: E402

SMALL = standin.gpt("small")  # 4 layers, 4 heads, 128 wide, 128 positions
ONLY_DP = SearchSpace(max_tp=1, max_pp=1, max_cp=1, recompute=("none",), offload=(False,))


def _total(est) -> int:
    return sum(est.memory.values())


def test_memory_too_small_without_zero3_so_the_winner_shards_parameters():
    world, batch = 8, 8
    zero2, zero3 = (standin.estimate(SMALL, ParallelLayout(dp=8, zero=z), standin.cluster(1 << 40), batch)
                    for z in (2, 3))
    memory = (_total(zero2) + _total(zero3)) // 2  # zero-3 fits, zero-2 does not: by construction
    result = search(SMALL, world, standin.cluster(memory), batch, space=ONLY_DP, estimator=standin.estimate)
    assert result.winner.layout.zero == 3
    assert all(p.layout.zero == 3 for p in result.plans)
    for stage in (0, 1, 2):
        verdict = next(v for v in result.families if v.family == f"zero-{stage}")
        assert verdict.kind == "memory" and "over the" in verdict.reason, verdict


def test_small_model_big_batch_slow_links_pure_dp_wins():
    """Every rank its own node (gpus_per_node 1, slow links): tp's per-layer collectives and the pipeline's
    per-microbatch sends (256 sequences) both lose to dp's one gradient all-reduce."""
    cluster = standin.cluster(1 << 40, inter_node_bandwidth=1e9, gpus_per_node=1)
    result = search(SMALL, 4, cluster, 256, estimator=standin.estimate)
    best = result.winner.layout
    assert (best.dp, best.tp, best.pp, best.cp) == (4, 1, 1, 1)
    assert best.recompute == "none" and not best.offload
    assert result.losers["tp 2 across nodes"].startswith("communication") and " tp " in result.losers["tp 2 across nodes"]
    assert result.losers["pp 2"].startswith("communication") and " pp " in result.losers["pp 2"]
    assert result.losers["recompute full"].startswith("compute")  # the winner recomputing: only slower


def test_few_microbatches_on_fast_links_the_pipeline_loses_on_its_bubble():
    # the schedules with a bubble at pp 2: Chimera's (p-2)/(2m+p-2) is 0 there, and rightly wins this case
    with_bubble = SearchSpace(schedules=("1f1b", "interleaved_1f1b", "zb_h1", "gpipe"))
    result = search(SMALL, 4, standin.cluster(1 << 40), 4, estimator=standin.estimate, space=with_bubble)
    assert result.winner.layout.pp == 1
    verdict = next(v for v in result.families if v.family == "pp 4")
    assert verdict.kind == "bubble" and verdict.best.bubble_s > 0, verdict


def test_divisibility_families_say_what_does_not_divide():
    result = search(standin.gpt("debug"), 8, standin.cluster(1 << 40), 8, estimator=standin.estimate)  # 4 heads, 2 layers
    by_family = {v.family: v for v in result.families}
    assert by_family["tp 8"].kind == "divisibility" and "4 heads" in by_family["tp 8"].reason
    assert by_family["pp 4"].kind == "divisibility" and "2 layers" in by_family["pp 4"].reason


def _no_tp_estimate(workload, layout, cluster, global_batch, memory_per_device=None):
    if layout.tp > 1:
        raise ValueError("this model has no tp plan")
    return standin.estimate(workload, layout, cluster, global_batch, memory_per_device)


def test_layouts_the_workload_refuses_are_a_reason_not_a_crash():
    result = search(SMALL, 4, standin.cluster(1 << 40), 16, estimator=_no_tp_estimate)
    assert result.winner.layout.tp == 1
    for family in ("tp 2", "tp 4"):
        assert result.losers[family].startswith("cannot run: the workload refuses it: this model has no tp plan")


def _every_layout(workload, world, batch, space):
    """Brute force: every layout of the space that divides."""
    facts = dict(world=world, num_layers=workload.num_layers, num_heads=workload.num_heads,
                 seq_len=workload.seq_len, global_batch=batch)
    sizes = [(dp, tp, pp, world // (dp * tp * pp)) for dp, tp, pp in itertools.product(range(1, world + 1), repeat=3)
             if world % (dp * tp * pp) == 0]
    for (dp, tp, pp, cp), zero, sp, mbs, sched, rec, off in itertools.product(
            sizes, space.zero, space.sequence_parallel, space.micro_batch_sizes,
            [(s, v) for s in space.schedules for v in ((1,) + space.virtual_stages if s == "interleaved_1f1b" else (1,))],
            space.recompute, space.offload):
        if tp & (tp - 1) or cp > space.max_cp:
            continue
        try:
            layout = ParallelLayout(dp=dp, tp=tp, pp=pp, cp=cp, zero=zero, sequence_parallel=sp, micro_batch_size=mbs,
                                    schedule=sched[0] if pp > 1 else "1f1b", virtual_stages=sched[1] if pp > 1 else 1,
                                    recompute=rec, offload=off)
        except ValueError:
            continue
        if not layout.problems(**facts):
            yield layout


@pytest.mark.parametrize("world, batch, memory_mib", [(4, 16, 8), (4, 64, 1 << 20), (8, 32, 12), (8, 8, 7)])
def test_winner_is_the_brute_force_optimum(world, batch, memory_mib):
    cluster = standin.cluster(memory_mib << 20)
    space = SearchSpace(min_cp_chunk=1)
    result = search(SMALL, world, cluster, batch, space=space, estimator=standin.estimate)
    priced = [standin.estimate(SMALL, layout, cluster, batch) for layout in _every_layout(SMALL, world, batch, space)]
    fitting = [e for e in priced if e.fits]
    if not fitting:
        assert not result.plans
        return
    best = min(e.step_time for e in fitting)
    assert result.winner.step_time == pytest.approx(best, rel=1e-9), (result.winner.layout, min(fitting, key=lambda e: e.step_time).layout)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=st.sampled_from([1, 2, 4, 6, 8, 12, 16]), layers=st.sampled_from([1, 2, 4, 6]),
       heads=st.sampled_from([1, 2, 4, 6]), batch=st.sampled_from([1, 4, 6, 16, 48]),
       memory_mib=st.sampled_from([1, 4, 16, 1 << 20]), gpus_per_node=st.sampled_from([1, 2, 8]))
def test_every_answer_keeps_the_invariants(world, layers, heads, batch, memory_mib, gpus_per_node):
    workload = standin.gpt("small", num_layers=layers, num_heads=heads, dim=16 * heads, block_size=16)
    cluster = standin.cluster(memory_mib << 20, gpus_per_node=gpus_per_node)
    result = search(workload, world, cluster, batch, top=1000, space=SearchSpace(min_cp_chunk=1), estimator=standin.estimate)
    facts = dict(world=world, num_layers=layers, num_heads=heads, seq_len=16, global_batch=batch)
    times = [p.step_time for p in result.plans]
    assert times == sorted(times)
    for plan in result.plans:
        assert plan.layout.world == world and plan.fits and _total(plan) <= memory_mib << 20
        assert plan.layout.problems(**facts) == []
    # The memory lower bound never rules out a layout that would fit (checked with the cost model itself).
    for layout, why in result.ruled_out.items():
        if why.startswith("memory"):
            assert not standin.estimate(workload, layout, cluster, batch).fits, (layout, why)
    # Every family the winner is not in has a reason; none of the winner's own families is listed.
    if result.plans:
        assert not set(result.losers) & {f for f in _families(result.winner.layout, gpus_per_node)}
    else:
        assert all(v.kind in ("memory", "divisibility") for v in result.families)


def _families(layout, gpus_per_node):
    from dtensor_plus.plan.families import families_of

    return families_of(layout, gpus_per_node)


def test_train_gpt_space_returns_only_what_train_gpt_runs():
    batch = 16
    result = search(SMALL, 4, standin.cluster(1 << 40), batch, top=1000, space=SearchSpace.train_gpt(batch),
                    estimator=standin.estimate)
    assert result.plans
    for plan in result.plans:
        plan.layout.to_train_gpt_flags(batch)  # raises if train_gpt has no flag for it


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="world"):
        search(SMALL, 0, standin.cluster(1 << 30), 8, estimator=standin.estimate)
    with pytest.raises(ValueError, match="global_batch"):
        search(SMALL, 2, standin.cluster(1 << 30), 0, estimator=standin.estimate)
    nothing = search(SMALL, 2, standin.cluster(1 << 10), 8, estimator=standin.estimate)
    with pytest.raises(ValueError, match="no layout .* fits"):
        nothing.winner  # noqa: B018


def _search_in_a_process_group():
    from dtensor_plus.plan import gpt_workload

    try:
        search(gpt_workload("tiny"), 2, standin.cluster(1 << 30), 4)
    except RuntimeError as err:
        return str(err)
    return None


def test_search_inside_a_process_group_says_where_to_plan_instead():
    from dtensor_plus.testing import run_on_ranks

    message = run_on_ranks(1, _search_in_a_process_group, timeout=120.0)[0]
    assert message is not None and "fresh process" in message and "python -m dtensor_plus.plan" in message

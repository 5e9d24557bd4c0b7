"""cost.estimate on small cases with hand-computed expectations (examples/gpt.py's GPT, 4 layers, tiny)."""

import pytest

from dtensor_plus.layouts.pipeline import bubble_formula
from dtensor_plus.plan.cost import collective_time, estimate, pipeline_time
from dtensor_plus.plan.hardware import CLUSTERS, Cluster, Link
from dtensor_plus.plan.layout import ParallelLayout
from dtensor_plus.plan.profile import profile
from dtensor_plus.plan.workload import gpt_workload

TINY = gpt_workload(dict(name="tiny-4", num_layers=4, dim=64, num_heads=4, block_size=32, vocab_size=256))
# One GPU a node: every mesh dim crosses nodes (the slow link); no latency, so times are bytes / bandwidth.
SLOW = Cluster("test", 1, 1e12, 2**30, Link(100e9, 0.0), Link(1e9, 0.0), 0.5)


def test_pure_dp_step_is_compute_plus_the_exposed_last_bucket():
    layout = ParallelLayout(dp=4)
    est = estimate(TINY, layout, SLOW, global_batch=8)  # 2 microbatches of 1 sequence per rank
    prof = profile(TINY, layout)
    compute = 2 * (prof.forward_flops + prof.backward_flops) / (1e12 * 0.5)
    sync = 2 * 3 * prof.gradient_bytes // 4 / 1e9  # ring all-reduce: 2(n-1)/n of the gradients, per step
    last_bucket = sync / (TINY.num_layers + 1)
    hidden = min(sync - last_bucket, (prof.backward_flops) / (1e12 * 0.5))
    assert est.compute_s == pytest.approx(compute)
    assert est.communication_s["dp"] == pytest.approx(sync)
    assert est.exposed_communication_s["dp"] == pytest.approx(sync - hidden)
    assert est.step_time == pytest.approx(compute + sync - hidden)
    assert est.bubble_s == 0 and est.fits


def test_doubling_bandwidth_halves_the_communication():
    layout = ParallelLayout(tp=2, dp=2)
    base = estimate(TINY, layout, SLOW, global_batch=4)
    fast = estimate(TINY, layout, SLOW.replace(inter_node=Link(2e9, 0.0)), global_batch=4)
    for dim, t in base.communication_s.items():
        assert fast.communication_s[dim] == pytest.approx(t / 2)
    assert fast.compute_s == base.compute_s


def test_tp_collectives_are_exposed():
    est = estimate(TINY, ParallelLayout(tp=2), SLOW, global_batch=2)
    assert est.exposed_communication_s["tp"] == pytest.approx(est.communication_s["tp"])
    assert est.step_time == pytest.approx(est.compute_s + est.communication_s["tp"])


@pytest.mark.parametrize("p,m", [(4, 8), (4, 32), (2, 3)])
def test_1f1b_bubble_is_the_published_fraction(p, m):
    # equal stages, F = 1, B = 2, no p2p time: step = (m + p - 1)(F + B), bubble share (p-1)/(m+p-1)
    out = pipeline_time("1f1b", p, m, 1, (1.0,) * p, (2.0,) * p, (0.0,) * p, 0.0)
    assert out["step_time"] == pytest.approx((m + p - 1) * 3.0)
    bubble = (out["step_time"] - out["busy_max"]) / out["step_time"]
    assert bubble == pytest.approx(bubble_formula("1f1b", p, m))
    assert out["in_flight"][0] == min(p, m)


def test_interleaved_bubble_extrapolated_from_small_m():
    p, m, v = 4, 64, 2
    out = pipeline_time("interleaved_1f1b", p, m, v, (1.0,) * p, (2.0,) * p, (0.0,) * p, 0.0)
    bubble = (out["step_time"] - out["busy_max"]) / out["step_time"]
    assert bubble == pytest.approx(bubble_formula("interleaved_1f1b", p, m, v), rel=1e-6)


def test_pipeline_layout_memory_and_bubble():
    layout = ParallelLayout(pp=2)
    est = estimate(TINY, layout, CLUSTERS["a100"], global_batch=8)
    first, last = profile(TINY, layout, 0), profile(TINY, layout, 1)
    # 1F1B: the first stage holds 2 microbatches in flight, the last 1
    worst = max(first.state_bytes + 2 * first.activation_bytes, last.state_bytes + last.activation_bytes)
    assert est.memory_total == worst
    assert est.bubble_s > 0
    assert est.communication_s["pp"] > 0


def test_memory_budget_and_mfu():
    est = estimate(TINY, ParallelLayout(dp=2), CLUSTERS["a100"], global_batch=2, memory_per_device=1000)
    assert not est.fits
    tokens = 2 * 32
    assert est.mfu == pytest.approx(TINY.model_flops(tokens) / (2 * 312e12 * est.step_time))


def test_collective_time_alpha_beta():
    link = Link(10.0, 0.5)
    assert collective_time("all_reduce", 4, 30.0, 1, link) == pytest.approx(3.0 + 6 * 0.5)
    assert collective_time("all_gather", 4, 30.0, 2, link) == pytest.approx(3.0 + 2 * 3 * 0.5)


@pytest.mark.parametrize("layout", [ParallelLayout(pp=2, dp=2), ParallelLayout(dp=2, zero=1, offload=True),
                                    ParallelLayout(pp=2, tp=2, dp=2, zero=3)], ids=str)
def test_step_time_is_compute_exposed_communication_and_bubble(layout):
    # the parts a report stacks add up to the step: nothing unaccounted
    est = estimate(TINY, layout, SLOW, global_batch=8)
    parts = est.compute_s + est.bubble_s + sum(est.exposed_communication_s.values())
    assert est.step_time == pytest.approx(parts, rel=1e-9)


def test_cp_ring_shifts_hide_behind_attention_only():
    layout = ParallelLayout(cp=2)
    prof = profile(TINY, layout)
    assert prof.forward_attention_flops > 0 and prof.backward_attention_flops > 0
    # a link so slow that the ring outlasts the attention kernels: the excess shows, nothing more
    est = estimate(TINY, layout, SLOW, global_batch=1)
    ring = {ph: prof.microbatch_collectives[("ring_shift", "cp", ph)] / 1e9 for ph in ("forward", "backward")}
    attention = {"forward": prof.forward_attention_flops / 0.5e12, "backward": prof.backward_attention_flops / 0.5e12}
    others = sum(b for (c, d, ph), b in prof.microbatch_collectives.items() if d == "cp" and c != "ring_shift") / 1e9
    expected = sum(max(0.0, ring[ph] - attention[ph]) for ph in ring) + others
    # and the per-step gradient sync over cp: buckets behind the backward, the last one exposed
    sync = prof.step_collectives[("all_reduce", "cp")] / 1e9
    last = sync / (TINY.num_layers + 1)
    expected += last + max(0.0, sync - last - (prof.backward_flops / 0.5e12))
    assert ring["forward"] > attention["forward"]  # the case tests something: the ring is not all hidden
    assert est.exposed_communication_s["cp"] == pytest.approx(expected)

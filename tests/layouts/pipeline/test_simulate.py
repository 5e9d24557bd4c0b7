"""The simulator against the published figures, and the timeline picture.

Under the papers' assumptions (equal stages, T_F = T_B = T_W, BW = B + W, no latency): GPipe and 1F1B
(p-1)/(m+p-1) exactly; interleaved (p-1)/(v*m+p-1) exactly; ZB-H1 idles exactly a third of 1F1B's idle
time (m >= p); ZB-V below ZB-H1. Peak in-flight activations: GPipe m, 1F1B min(p, m) on rank 0.
"""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtensor_plus.layouts.pipeline.actions import Action, Kind, Schedule
from dtensor_plus.layouts.pipeline.schedules import SCHEDULES, gpipe, interleaved_1f1b, one_f_one_b, zb_h1, zb_v
from dtensor_plus.layouts.pipeline.simulate import bubble_formula, simulate
from dtensor_plus.layouts.pipeline.validate import peer

EXACT = 1e-12
ps, ms = st.integers(1, 6), st.integers(1, 10)


@settings(max_examples=25)
@given(p=ps, m=ms, f=st.sampled_from([1.0, 0.5, 2.0]), bw=st.sampled_from([2.0, 3.0, 1.0]))
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(p, m, f, bw):
    costs = {Kind.F: f, Kind.BW: bw}  # the formula holds for any F:BW ratio when stages are equal
    for gen in (gpipe, one_f_one_b):
        r = simulate(gen(p, m), costs)
        assert r.bubble == pytest.approx((p - 1) / (m + p - 1), abs=EXACT)
        assert r.step_time == pytest.approx((m + p - 1) * (f + bw), abs=EXACT)
        assert all(b == pytest.approx(r.bubble, abs=EXACT) for b in r.bubble_per_rank)


@settings(max_examples=25)
@given(p=ps, groups=st.integers(1, 3), v=st.integers(1, 4))
def test_interleaved_bubble_is_p_minus_1_over_vm_plus_p_minus_1(p, groups, v):
    m = groups * p
    r = simulate(interleaved_1f1b(p, m, v))
    assert r.bubble == pytest.approx((p - 1) / (v * m + p - 1), abs=EXACT)
    assert r.bubble == pytest.approx(bubble_formula("interleaved_1f1b", p, m, v), abs=EXACT)


@settings(max_examples=25)
@given(p=st.integers(2, 6), extra=st.integers(0, 6))
def test_zb_h1_idles_a_third_of_1f1b_and_zb_v_less(p, extra):
    m = p + extra  # the published ZB-H1 figure assumes at least p microbatches
    one, h1, v = simulate(one_f_one_b(p, m)), simulate(zb_h1(p, m)), simulate(zb_v(p, m))
    idle_1f1b = one.step_time - one.busy_per_rank[0]  # (p-1)(T_F + T_B + T_W)
    idle_h1 = h1.step_time - h1.busy_per_rank[0]  # (p-1)(T_F + T_B - T_W)
    assert idle_1f1b == pytest.approx(3 * (p - 1), abs=EXACT)
    assert idle_h1 == pytest.approx(p - 1, abs=EXACT)
    assert h1.bubble == pytest.approx(bubble_formula("zb_h1", p, m), abs=EXACT)
    assert h1.bubble < one.bubble / 2  # "about a third" as a fraction: (m+p-1)/(3m+p-1) of it, in (1/3, 1/2)
    assert v.bubble < h1.bubble
    if m == p or m >= p + 2:  # where the list-scheduled ZB-V reaches its floor: only the warm-up of rank p-1
        assert v.bubble == pytest.approx(bubble_formula("zb_v", p, m), abs=EXACT)


@settings(max_examples=25)
@given(p=ps, m=ms)
def test_peak_in_flight_activations(p, m):
    assert simulate(gpipe(p, m)).peak_in_flight == (m,) * p  # GPipe holds every microbatch
    peak_1f1b = simulate(one_f_one_b(p, m)).peak_in_flight
    assert peak_1f1b[0] == min(p, m) and max(peak_1f1b) <= p
    assert max(simulate(zb_h1(p, m)).peak_in_flight) <= p  # ZB-H1 keeps 1F1B's memory
    assert max(simulate(zb_v(p, m)).peak_in_flight) <= 2 * p  # 2p half-stages = p microbatches


@settings(max_examples=20)
@given(name=st.sampled_from(sorted(SCHEDULES)), p=st.integers(1, 4), m=st.integers(1, 6),
       latency=st.sampled_from([0.0, 0.25, 1.0]))
def test_events_replay_the_lists_with_their_costs(name, p, m, latency):
    costs = {Kind.F: 1.0, Kind.B: 1.5, Kind.W: 0.5, Kind.BW: 2.0, Kind.STEP: 0.25}
    s = SCHEDULES[name](p=p, m=m * p) if name == "interleaved_1f1b" else SCHEDULES[name](p=p, m=m)
    r = simulate(s, costs, latency)
    for rank in range(p):
        mine = [e for e in r.events if e.rank == rank]
        assert tuple(e.action for e in mine) == s.actions[rank]  # in list order, each once
        assert all(a.end <= b.start + EXACT for a, b in zip(mine, mine[1:]))  # a rank does one thing at a time
        for e in mine:
            if not e.action.kind.is_comm:
                assert e.end - e.start == pytest.approx(costs[e.action.kind])
    ends = {(e.rank, e.action): e.end for e in r.events}
    for e in r.events:
        if e.action.kind in (Kind.RECV_F, Kind.RECV_B):
            sender, send = peer(s, e.action)
            assert e.end >= ends[(sender, send)] + latency - EXACT
    assert r.step_time == pytest.approx(max(ends.values()))


def test_gpipe_step_time_with_latency():
    # F0 walks down the pipe, the last rank runs m F and m BW back to back, the last BW walks back up
    p, m, lat = 4, 3, 0.5
    r = simulate(gpipe(p, m), latency=lat)
    assert r.step_time == pytest.approx(m * 3 + (p - 1) * (3 + 2 * lat))


def test_simulate_rejects_bad_input():
    broken = Schedule("broken", 1, 1, (0,), ((Action(Kind.F, 0, 0), Action(Kind.STEP)),))
    with pytest.raises(ValueError, match=r"broken: rank 0 never runs B and W, or BW"):
        simulate(broken)
    with pytest.raises(ValueError, match="costs must map Kind"):
        simulate(gpipe(2, 2), {Kind.F: -1.0})
    with pytest.raises(ValueError, match="no published bubble formula for 'zb_h2'"):
        bubble_formula("zb_h2", 4, 8)


def test_validated_skips_the_check_but_a_deadlock_still_raises():
    plan = one_f_one_b(3, 5)
    costs = {Kind.F: 1.0, (Kind.F, 1): 2.5, Kind.BW: 2.0}
    assert simulate(plan, costs, 0.5, validated=True) == simulate(plan, costs, 0.5)
    # rank 0 waits for the gradient before it sends the forward that would produce it: a deadlock
    ok = gpipe(2, 1)
    recv_b = next(a for a in ok.actions[0] if a.kind is Kind.RECV_B)
    deadlocked = dataclasses.replace(ok, actions=((recv_b, *(a for a in ok.actions[0] if a != recv_b)),
                                                  ok.actions[1]))
    with pytest.raises(ValueError, match="deadlock"):
        simulate(deadlocked)  # the validator's message
    with pytest.raises(ValueError, match=r"deadlocks \(each stalled rank's next action: \{0: .*validated=True"):
        simulate(deadlocked, validated=True)


def test_timeline_png_side_by_side_with_idle_visible(tmp_path):
    pytest.importorskip("matplotlib", reason="the timeline picture needs matplotlib (the examples extra)")
    from matplotlib.image import imread

    from dtensor_plus.layouts.pipeline.timeline import COLORS, IDLE, plot_timelines

    panels = [("1f1b", simulate(one_f_one_b(4, 8)).events), ("zb_h1", simulate(zb_h1(4, 8)).events)]
    path = tmp_path / "timeline.png"
    plot_timelines(panels, path)
    img = imread(path)
    height, width = img.shape[:2]
    assert width > 2 * height  # two panels side by side
    rgb = (img[..., :3] * 255).round().astype(int)
    for color in (IDLE, COLORS[Kind.F], COLORS[Kind.BW], COLORS[Kind.B], COLORS[Kind.W]):
        want = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
        assert (rgb == want).all(axis=-1).any(), f"no {color} pixel: that colour is not drawn"
    with pytest.raises(ValueError, match="at least one"):
        plot_timelines([], path)


def test_recorded_run_beside_its_simulation(tmp_path):
    pytest.importorskip("matplotlib", reason="the timeline picture needs matplotlib (the examples extra)")
    from dtensor_plus.layouts.pipeline.simulate import costs_from_events
    from dtensor_plus.layouts.pipeline.timeline import plot_recorded_vs_simulated

    # stand-in for a real run: the same schedule timed with other costs; its twin must recover them
    s, costs = zb_h1(3, 4), {Kind.F: 0.003, Kind.B: 0.004, Kind.W: 0.002, Kind.STEP: 0.001}
    recorded = simulate(s, costs, latency=0.0005).events
    assert costs_from_events(recorded) == pytest.approx(costs)
    twin = plot_recorded_vs_simulated(s, recorded, tmp_path / "twin.png", latency=0.0005)
    assert twin.step_time == pytest.approx(max(e.end for e in recorded))
    assert (tmp_path / "twin.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no compute events"):
        costs_from_events([e for e in recorded if e.action.kind.is_comm])


def test_per_stage_costs_replay_unequal_stages():
    """Costs keyed (Kind, stage) time each stage on its own: recovered from a run's events, they replay it exactly
    (per-kind medians would not: the last stage here is three times the others)."""
    from dtensor_plus.layouts.pipeline.simulate import costs_from_events, stage_costs_from_events

    s = one_f_one_b(3, 6)
    costs = {Kind.F: 1.0, Kind.BW: 2.0, (Kind.F, 2): 3.0, (Kind.BW, 2): 6.0}
    run = simulate(s, costs)
    assert all(e.end - e.start == pytest.approx(3.0 if e.action.kind is Kind.F else 6.0)
               for e in run.events if e.action.stage == 2 and e.action.kind.is_compute)
    twin = simulate(s, stage_costs_from_events(run.events))
    assert twin.step_time == pytest.approx(run.step_time) and twin.bubble == pytest.approx(run.bubble)
    assert simulate(s, costs_from_events(run.events)).bubble < run.bubble - 0.1  # medians hide the slow stage
    with pytest.raises(ValueError, match=r"costs must map Kind \(or \(Kind, stage\)\)"):
        simulate(s, {(Kind.F, "last"): 1.0})

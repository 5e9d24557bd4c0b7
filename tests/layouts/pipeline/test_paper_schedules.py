"""The papers' schedules as data: each passes the validator and, in the simulator, meets its paper's figure.

DualPipeV: every rank idles (p-1)(F&B + B - 3W) with the pair uncredited, the slowest rank exactly that with any
F&B, peak 2p+1 half stages (DeepSeek's PP+1). V-Half / V-Min: peak (F to W) exactly (p+2)//2 and (p+4)//3
microbatches; their bubbles are reported beside the paper's approximations in benchmarks/pipeline.py (V-Half's
below 1F1B's, asserted; V-Min's list-scheduled order stays above the paper's ~2p/(3m), not asserted as it).
Breadth-first: the loop formula for every m, m < p included. Chimera (T_F = T_B):
(p-2)/(2m+p-2) for even p, even m >= p+2. Seq1F1B / TeraPipe: (p-1)/(k*m+p-1), Seq1F1B peak p+k-1 chunks.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtensor_plus.layouts.pipeline.actions import Action, Kind, Schedule
from dtensor_plus.layouts.pipeline.executor import build_schedule
from dtensor_plus.layouts.pipeline.schedules import one_f_one_b
from dtensor_plus.layouts.pipeline.schedules_bidirectional import chimera
from dtensor_plus.layouts.pipeline.schedules_looped import breadth_first
from dtensor_plus.layouts.pipeline.schedules_sequence import seq1f1b, terapipe
from dtensor_plus.layouts.pipeline.schedules_v import dualpipe_v, v_half, v_min
from dtensor_plus.layouts.pipeline.simulate import activation_formula, bubble_formula, peak_until_w, simulate
from dtensor_plus.layouts.pipeline.validate import validate

EXACT = 1e-12
F, B, W, BW = Kind.F, Kind.B, Kind.W, Kind.BW


@settings(max_examples=12, deadline=None)
@given(p=st.integers(1, 6), extra=st.integers(0, 5), f_and_b=st.sampled_from([None, 3.0, 2.5, 2.0]))
def test_dualpipe_v_idles_deepseeks_bubble(p, extra, f_and_b):
    m = 2 * p + extra
    s = dualpipe_v(p, m)
    r = simulate(s, f_and_b=f_and_b)
    pair = 3.0 if f_and_b is None else f_and_b  # F + a full backward when uncredited
    idle = [r.step_time - busy for busy in r.busy_per_rank]
    assert max(idle) == pytest.approx((p - 1) * (pair + 2 - 3), abs=EXACT)  # (PP/2-1)(F&B + B - 3W)
    if f_and_b is None:
        assert all(i == pytest.approx(idle[0], abs=EXACT) for i in idle)
        assert r.bubble == pytest.approx(bubble_formula("dualpipe_v", p, m), abs=EXACT)
    assert max(r.peak_in_flight) == activation_formula("dualpipe_v", p)  # PP + 1
    assert len(s.overlapped) == sum(2 * m - 3 * p + r_ + 1 - (r_ == p - 1) for r_ in range(p))


def test_dualpipe_v_needs_2p_microbatches_and_overlap_pairs_are_checked():
    with pytest.raises(ValueError, match=r"m=5 microbatches must be at least 2p=6"):
        dualpipe_v(3, 5)
    s = dualpipe_v(2, 4)
    first, second = sorted(s.overlapped, key=repr)[0]
    rank = s.stage_to_rank[first.stage]
    acts = list(s.actions[rank])
    i = acts.index(second)
    moved = acts[:i] + [acts[i + 1], second] + acts[i + 2:]  # something between the two of the pair
    bad = Schedule(s.name, s.num_ranks, s.n_microbatches, s.stage_to_rank,
                   tuple(tuple(moved) if r == rank else a for r, a in enumerate(s.actions)), s.overlapped)
    with pytest.raises(ValueError, match="must come right before it"):
        validate(bad, in_order=False)
    # a backward beside its own forward: it needs the forward's result, the pair cannot overlap
    dependent = Schedule(s.name, s.num_ranks, s.n_microbatches, s.stage_to_rank, s.actions,
                         s.overlapped | {(Action(F, 3, 0), Action(B, 3, 0))})
    with pytest.raises(ValueError, match=r"B3.0: F3.0 must run before its backward"):
        validate(dependent)
    absent = Schedule(s.name, s.num_ranks, s.n_microbatches, s.stage_to_rank, s.actions,
                      s.overlapped | {(Action(F, 3, 0), Action(BW, 3, 0))})
    with pytest.raises(ValueError, match="names an action the rank does not run"):
        validate(absent)


@pytest.mark.parametrize("p", [2, 3, 4, 5, 6, 8])
def test_v_half_and_v_min_hold_the_papers_memory(p):
    m = 3 * p + 1
    one = simulate(one_f_one_b(p, m))
    for name, gen in (("v_half", v_half), ("v_min", v_min)):
        s = gen(p, m)
        assert max(peak_until_w(s)) == activation_formula(name, p)  # half stages, F to W
        # the fraction of 1F1B's p microbatches (2p half stages) on its busiest rank
        assert activation_formula(name, p) / (2 * max(one.peak_in_flight)) <= {"v_half": 0.5 + 1 / p,
                                                                              "v_min": 1 / 3 + 2 / p}[name]


@settings(max_examples=15, deadline=None)
@given(p=st.integers(1, 7), m=st.integers(1, 16))
def test_v_half_and_v_min_never_stall_and_validate(p, m):
    for gen in (v_half, v_min):
        s = gen(p, m)  # the list scheduler raises when its memory rule stalls
        validate(s)
        assert max(peak_until_w(s)) <= activation_formula(gen.__name__, p)


@pytest.mark.parametrize("p", [2, 4, 6, 8])  # odd p: the cap (p+2)//2 rounds down, below half
def test_v_half_bubble_below_1f1b_at_half_its_memory(p):
    for m in (2 * p, 8 * p):  # the paper's ~p/(2m) is within 15% at m = 8p: reported, not asserted
        assert simulate(v_half(p, m)).bubble < simulate(one_f_one_b(p, m)).bubble


@settings(max_examples=20, deadline=None)
@given(p=st.integers(1, 5), m=st.integers(1, 8), v=st.integers(1, 3))
def test_breadth_first_bubble_and_memory(p, m, v):
    r = simulate(breadth_first(p, m, v))
    assert r.bubble == pytest.approx(bubble_formula("breadth_first", p, m, v), abs=EXACT)
    if m >= p:
        assert r.bubble == pytest.approx((p - 1) / (v * m + p - 1), abs=EXACT)
    assert r.peak_in_flight == (v * m,) * p  # breadth-first keeps every activation, like GPipe


@pytest.mark.parametrize("p, m", [(2, 4), (4, 6), (4, 12), (6, 8), (6, 18), (8, 10)])
def test_chimera_bubble(p, m):
    s = chimera(p, m)
    r = simulate(s, {F: 1.0, BW: 1.0})
    assert r.bubble == pytest.approx(bubble_formula("chimera", p, m), abs=EXACT)
    assert r.bubble < simulate(one_f_one_b(p, m), {F: 1.0, BW: 1.0}).bubble or p == 2
    assert max(r.peak_in_flight) == activation_formula("chimera", p)
    assert s.num_pipelines == 2 and all(s.runs(st_, mb) == (st_ // p == mb % 2) for st_ in range(2 * p)
                                        for mb in range(m))


def test_chimera_rejects_odd_ranks_and_microbatches_outside_their_pipeline():
    with pytest.raises(ValueError, match="even number of ranks"):
        chimera(3, 4)
    s = chimera(2, 2)
    wrong = tuple((Action(F, 2, 0),) + a if r == 1 else a for r, a in enumerate(s.actions))
    with pytest.raises(ValueError, match="microbatch 0 runs through pipeline 0, stage 2 is not in it"):
        validate(Schedule(s.name, 2, 2, s.stage_to_rank, wrong, num_pipelines=2))


@settings(max_examples=20, deadline=None)
@given(p=st.integers(1, 5), m=st.integers(1, 4), k=st.integers(1, 4))
def test_sequence_pipelines_bubble_and_memory(p, m, k):
    for name, gen in (("seq1f1b", seq1f1b), ("terapipe", terapipe)):
        r = simulate(gen(p, m, k))
        assert r.bubble == pytest.approx(bubble_formula(name, p, m, k=k), abs=EXACT)
    assert simulate(seq1f1b(p, m, k)).peak_in_flight[0] == min(activation_formula("seq1f1b", p, k), m * k)


def test_sequence_chunks_keep_the_causal_order():
    s = seq1f1b(2, 1, 2)
    swapped = tuple(tuple(sorted(a, key=lambda x: (x.kind is not F, -x.microbatch if x.kind is F else 0)))
                    if r == 0 else a for r, a in enumerate(s.actions))
    with pytest.raises(ValueError, match="the earlier sequence chunk"):
        validate(Schedule(s.name, 2, 2, s.stage_to_rank, swapped, sequence_chunks=2), in_order=False)
    backward_first = list(s.actions[1])
    i, j = backward_first.index(Action(BW, 1, 0)), backward_first.index(Action(BW, 1, 1))
    backward_first[i], backward_first[j] = backward_first[j], backward_first[i]
    with pytest.raises(ValueError, match="the later sequence chunk"):
        validate(Schedule(s.name, 2, 2, s.stage_to_rank, (s.actions[0], tuple(backward_first)), sequence_chunks=2),
                 in_order=False)


def test_every_new_name_builds_and_validates():
    for name in ("dualpipe_v", "v_half", "v_min", "breadth_first", "chimera"):
        for p, m in ((2, 4), (4, 9)):
            validate(build_schedule(name, p, m, stages_per_rank=2))
    assert build_schedule("ScheduleDualPipeV", 2, 4).name == "dualpipe_v"

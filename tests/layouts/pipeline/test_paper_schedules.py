"""The papers' schedules as data: each passes the validator and, in the simulator, meets its paper's figure.

DualPipeV: every rank idles (p-1)(F&B + B - 3W) with the pair uncredited, the slowest rank exactly that with any
F&B, peak 2p+1 half stages (DeepSeek's PP+1). V-Half / V-Min (building blocks): peak (F to W) exactly
(p+2)//2 and (p+4)//3 microbatches, the blocks' exact idle, and bubbles at or below the paper's ~p/(2m), ~2p/(3m).
Breadth-first: the loop formula for every m, m < p included. Chimera (T_F = T_B): (p-2)/(2m+p-2) for even p, even
m >= p+2 and m a multiple of p (the paper's basic unit m = p, peak p). Seq1F1B / TeraPipe: (p-1)/(k*m+p-1), Seq1F1B
peak p+k-1 chunks.
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


@settings(max_examples=10, deadline=None)
@given(p=st.integers(1, 9), m=st.integers(1, 20))
def test_v_half_and_v_min_bubble_and_memory_exact(p, m):
    """The building blocks' idle per rank (half-stage slots, T_F = T_B = T_W) and peak memory, F to W, exactly:
    V-Min 4p-5 (4p-3 when 3 | p > 3) at 2((p+4)//3) half stages, V-Half 3p + p//2 - 4 at 2((p+2)//2)."""
    for name, gen, exact_from in (("v_min", v_min, 2), ("v_half", v_half, p)):
        s = gen(p, m)
        r = simulate(s)  # validates first
        assert max(peak_until_w(s)) == min(activation_formula(name, p), 2 * m)
        if m >= exact_from or p == 1:
            assert r.bubble == pytest.approx(bubble_formula(name, p, m), abs=EXACT)
        assert r.bubble <= simulate(one_f_one_b(p, m)).bubble + EXACT


@pytest.mark.parametrize("p, m", [(4, 8), (8, 24), pytest.param(8, 64, marks=pytest.mark.slow),
                                  pytest.param(6, 36, marks=pytest.mark.slow)])
def test_v_half_and_v_min_meet_the_papers_figures(p, m):
    """The paper (Qi et al. 2024, T_F = T_B = T_W): V-Min ~2p/(3m) bubble at (p+4)//3 microbatches of memory, a
    third of 1F1B's p; V-Half ~p/(2m) at (p+2)//2, half. Our bubbles are at or below those figures here (p <= 9)."""
    one = simulate(one_f_one_b(p, m))
    for name, gen, paper_bubble, share in (("v_min", v_min, 2 * p / (3 * m), 1 / 3),
                                           ("v_half", v_half, p / (2 * m), 1 / 2)):
        s = gen(p, m)
        assert simulate(s).bubble <= paper_bubble
        held = max(peak_until_w(s)) / 2  # half stages -> microbatches
        assert held == {"v_min": (p + 4) // 3, "v_half": (p + 2) // 2}[name]
        assert held / max(one.peak_in_flight) <= share + 2 / p


@settings(max_examples=20, deadline=None)
@given(p=st.integers(1, 5), m=st.integers(1, 8), v=st.integers(1, 3))
def test_breadth_first_bubble_and_memory(p, m, v):
    r = simulate(breadth_first(p, m, v))
    assert r.bubble == pytest.approx(bubble_formula("breadth_first", p, m, v), abs=EXACT)
    if m >= p:
        assert r.bubble == pytest.approx((p - 1) / (v * m + p - 1), abs=EXACT)
    assert r.peak_in_flight == (v * m,) * p  # breadth-first keeps every activation, like GPipe


@pytest.mark.parametrize("p, m", [(2, 4), (4, 4), (4, 6), (4, 12), (6, 6), (6, 8), (6, 18), (8, 8), (8, 10)])
def test_chimera_bubble(p, m):
    s = chimera(p, m)
    r = simulate(s, {F: 1.0, BW: 1.0})
    assert r.bubble == pytest.approx(bubble_formula("chimera", p, m), abs=EXACT)
    assert r.bubble < simulate(one_f_one_b(p, m), {F: 1.0, BW: 1.0}).bubble or p == 2
    assert max(r.peak_in_flight) == activation_formula("chimera", p, m=m)  # p at m = p: the paper's basic unit
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

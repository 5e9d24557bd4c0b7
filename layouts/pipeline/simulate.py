"""Replays a Schedule with a cost per action kind: step time, bubble fraction, peak in-flight activations.

Each rank runs its list in order. A compute action takes its cost; a send is posted instantly (non-blocking)
and its data arrives ``latency`` later; a receive ends when its data has arrived. This is the model behind
the published figures (equal stages, no communication cost), so with the default costs

    >>> from dtensor_plus.layouts.pipeline.schedules import one_f_one_b
    >>> simulate(one_f_one_b(4, 8)).bubble  # (p-1)/(m+p-1)
    0.2727...

Costs default to F = B = W = 1 and BW = 2 (the zero-bubble paper's T_F = T_B = T_W), STEP and the
communication actions 0. The bubble of a rank is the share of the step (first action to last, over all
ranks) it spends not computing; the overall bubble is the same share over all ranks together.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .actions import Action, Event, Kind, Schedule
from .validate import peer, validate

DEFAULT_COSTS: Mapping[Kind, float] = {Kind.F: 1.0, Kind.B: 1.0, Kind.W: 1.0, Kind.BW: 2.0}


@dataclass(frozen=True)
class SimResult:
    """What one simulated step looks like.

    ``bubble_per_rank[r]``: idle share of rank r over the step; ``bubble``: idle share of all ranks.
    ``peak_in_flight[r]``: most (stage, microbatch) pairs rank r held at once whose F ran and whose backward
    (B or BW) had not: the activations it must keep. ``events``: every action with its start and end.
    """

    step_time: float
    busy_per_rank: tuple[float, ...]
    bubble_per_rank: tuple[float, ...]
    bubble: float
    peak_in_flight: tuple[int, ...]
    events: tuple[Event, ...]


def simulate(schedule: Schedule, costs: Mapping | None = None, latency: float = 0.0, *,
             f_and_b: float | None = None, validated: bool = False) -> SimResult:
    """Time one step of ``schedule`` (validated first) under ``costs`` (missing kinds cost 0, see
    DEFAULT_COSTS) and a point-to-point ``latency`` in the same units.

    ``validated=True``: the caller already ran ``validate`` on this very Schedule, so it is not checked again
    (most of a replay's time; a search replaying one schedule under many cost tables passes it). A schedule
    that was not in fact valid and stalls the replay still raises, naming the stalled ranks.

    A key of ``costs`` is a Kind, or a ``(Kind, stage)`` pair for one stage's cost of that kind (a real model's
    stages differ: the first holds the embedding, the last the head and the loss); a pair wins over its Kind.
    ``f_and_b``: the duration of one overlapped forward-and-backward pair (DualPipe's F&B); None charges the
    pair the sum of its two costs, i.e. no overlap, as a CPU runs it. A pair's two Events share its duration in
    proportion to their own costs, so the busy time of the rank counts the pair once."""
    costs = dict(DEFAULT_COSTS if costs is None else costs)
    bad = {k: c for k, c in costs.items() if not _is_cost_key(k) or c < 0}
    if bad or latency < 0 or (f_and_b is not None and f_and_b < 0):
        raise ValueError(f"costs must map Kind (or (Kind, stage)) to a duration >= 0 and latency and f_and_b be "
                         f">= 0; got {bad or (latency, f_and_b)!r}")
    if not validated:
        validate(schedule)

    def cost(a: Action) -> float:
        return costs.get((a.kind, a.stage), costs.get(a.kind, 0.0))

    duration = {}  # each action of an overlapped pair -> its share of the pair's duration
    for first, second in schedule.overlapped:
        both = cost(first) + cost(second)
        pair = both if f_and_b is None else f_and_b
        duration[first] = pair * cost(first) / both if both else 0.0
        duration[second] = pair - duration[first]
    arrival: dict[tuple[int, Action], float] = {}  # (receiving rank, its RECV) -> when the data is there
    clock = [0.0] * schedule.num_ranks
    pos = [0] * schedule.num_ranks
    events: list[Event] = []
    progress = True
    while progress:  # validate() ruled out deadlock, so this ends with every list replayed
        progress = False
        for rank, acts in enumerate(schedule.actions):
            while pos[rank] < len(acts):
                a = acts[pos[rank]]
                start = clock[rank]
                if a.kind in (Kind.RECV_F, Kind.RECV_B):
                    if (rank, a) not in arrival:
                        break
                    start = max(start, arrival[(rank, a)])
                end = start + (duration[a] if a in duration else cost(a))
                if a.kind in (Kind.SEND_F, Kind.SEND_B):
                    arrival[peer(schedule, a)] = end + latency
                events.append(Event(rank, a, start, end))
                clock[rank] = end
                pos[rank] += 1
                progress = True
    stalled = {r: schedule.actions[r][pos[r]] for r in range(schedule.num_ranks) if pos[r] < len(schedule.actions[r])}
    if stalled:  # only reachable with validated=True on an invalid schedule: validate() rules out deadlock
        raise ValueError(f"the schedule deadlocks (each stalled rank's next action: {stalled}); it was passed "
                         f"validated=True but is not valid: run validate(schedule) to see why")
    return _summarize(schedule, events)


def _summarize(schedule: Schedule, events: list[Event]) -> SimResult:
    step_time = max((e.end for e in events), default=0.0)
    busy = [0.0] * schedule.num_ranks
    for e in events:
        if e.action.kind.is_compute:
            busy[e.rank] += e.end - e.start
    bubble_per_rank = tuple(1.0 - b / step_time if step_time else 0.0 for b in busy)
    bubble = 1.0 - sum(busy) / (step_time * schedule.num_ranks) if step_time else 0.0
    events.sort(key=lambda e: (e.rank, e.start, e.end))
    return SimResult(step_time, tuple(busy), bubble_per_rank, bubble, peak_in_flight(schedule), tuple(events))


def peak_in_flight(schedule: Schedule) -> tuple[int, ...]:
    """Per rank, the most (stage, microbatch) activations held at once: F ran, its B or BW not yet.

    It depends only on each rank's order, not on timing, so it needs no costs.
    """
    return _peak_held(schedule, released_by=(Kind.B, Kind.BW))


def _peak_held(schedule: Schedule, released_by: tuple) -> tuple[int, ...]:
    """Per rank, the most activations held at once: each from its F until the first action of a kind in
    ``released_by``."""
    peaks = []
    for acts in schedule.actions:
        held = peak = 0
        for a in acts:
            if a.kind is Kind.F:
                held += 1
                peak = max(peak, held)
            elif a.kind in released_by:
                held -= 1
        peaks.append(peak)
    return tuple(peaks)


def costs_from_events(events: Sequence[Event]) -> dict[Kind, float]:
    """Median duration of each compute kind (and STEP) in recorded events: costs to simulate a real run with,
    so its simulated twin is drawn on the same time scale. The median, because a rank descheduled by the OS
    in the middle of one action would drag a mean."""
    totals: dict[Kind, list[float]] = {}
    for e in events:
        if e.action.kind.is_compute or e.action.kind is Kind.STEP:
            totals.setdefault(e.action.kind, []).append(e.end - e.start)
    if not totals:
        raise ValueError(f"no compute events among {len(events)} events: nothing to measure costs from")
    return {k: statistics.median(d) for k, d in totals.items()}


def stage_costs_from_events(events: Sequence[Event]) -> dict:
    """Median duration of each compute kind on each stage, keyed ``(Kind, stage)`` (STEP by Kind): ``simulate``
    with these replays a real run whose stages differ in cost, which per-kind medians average away."""
    totals: dict = {}
    for e in events:
        if e.action.kind.is_compute:
            totals.setdefault((e.action.kind, e.action.stage), []).append(e.end - e.start)
        elif e.action.kind is Kind.STEP:
            totals.setdefault(Kind.STEP, []).append(e.end - e.start)
    if not totals:
        raise ValueError(f"no compute events among {len(events)} events: nothing to measure costs from")
    return {k: statistics.median(d) for k, d in totals.items()}


def _is_cost_key(key) -> bool:
    return isinstance(key, Kind) or (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], Kind)
                                     and isinstance(key[1], int))


def bubble_formula(name: str, p: int, m: int, v: int = 1, k: int = 1) -> float:
    """The bubble fraction of a schedule under equal stages, T_F = T_B = T_W (BW = 2), no latency.

    Published: GPipe, 1F1B (p-1)/(m+p-1); interleaved (p-1)/(v*m+p-1); ZB-H1 idles (p-1)(T_F+T_B-T_W)
    against m(T_F+T_B+T_W) of work, i.e. (p-1)/(3m+p-1) (for m >= p). ZB-V is our derivation, not a paper's
    number (it reports "zero bubble"): with half-size stages the only idle left is the last rank's warm-up,
    p-1 half-stage forwards, so (p-1)/(6m+p-1); our zb_v reaches it for m == p and m >= p+2.
    DualPipeV: DeepSeek's idle (PP/2-1)(F&B + B - 3W) per rank, PP = 2p stages, B a full backward, here with the
    overlapped pair charged F + B (no overlap credit, F&B = 3): 2(p-1) against 6m of work, (p-1)/(3m+p-1).
    Breadth-first (Lamy-Poirier): (p-1)/(v*m+p-1) for m >= p; below, each loop waits p-m slots, written out.
    Chimera (Li & Hoefler, with T_F = T_B, costs {F: 1, BW: 1}): (p-2)/(2m+p-2), even p, m even >= p+2 or a
    multiple of p (the paper's basic unit m = p included).
    Seq1F1B and TeraPipe with k equal sequence chunks per microbatch: (p-1)/(k*m+p-1).
    V-Half and V-Min: the paper gives only ~p/(2m) and ~2p/(3m); these are the exact idles of our building blocks
    (``schedules_v.py``) in half-stage slots against 6m of work: V-Min 4p-5 (4p-3 when 3 | p > 3) for m >= 2, V-Half
    3p + p//2 - 4 for m >= p; both 0 at p = 1.
    """
    v_min_idle = 0 if p == 1 else 4 * p - 5 + 2 * (p % 3 == 0 and p > 3)
    v_half_idle = 0 if p == 1 else 3 * p + p // 2 - 4
    formulas = {
        "gpipe": lambda: (p - 1) / (m + p - 1),
        "1f1b": lambda: (p - 1) / (m + p - 1),
        "interleaved_1f1b": lambda: (p - 1) / (v * m + p - 1),
        "zb_h1": lambda: (p - 1) / (3 * m + p - 1),
        "zb_v": lambda: (p - 1) / (6 * m + p - 1),
        "v_min": lambda: v_min_idle / (6 * m + v_min_idle),
        "v_half": lambda: v_half_idle / (6 * m + v_half_idle),
        "dualpipe_v": lambda: (p - 1) / (3 * m + p - 1),
        "breadth_first": lambda: 1 - v * m / ((v - 1) * max(m, p) + m + p - 1),
        "chimera": lambda: (p - 2) / (2 * m + p - 2),
        "seq1f1b": lambda: (p - 1) / (k * m + p - 1),
        "terapipe": lambda: (p - 1) / (k * m + p - 1),
    }
    if name not in formulas:
        raise ValueError(f"no published bubble formula for {name!r}; known: {sorted(formulas)}")
    return formulas[name]()


def activation_formula(name: str, p: int, k: int = 1, m: int | None = None) -> int:
    """The papers' peak activations of a rank, in the simulator's units (``peak_in_flight``: one stage's
    activations of one microbatch; half a 1F1B stage on the V schedules, one sequence chunk on the sequence ones),
    for m large enough to reach the steady state. 1F1B p; DualPipeV DeepSeek's PP+1 = 2p+1 half stages; V-Half
    (p+2)//2 and V-Min (p+4)//3 microbatches (two half stages each; held F to W, ``peak_until_w``); Seq1F1B p+k-1
    chunks (1F1B over chunks); Chimera p+1 with our 1F1B-merged order (m not a multiple of p); the paper's N = D
    unit, and our order for m a multiple of p (pass ``m``), holds p."""
    formulas = {
        "1f1b": lambda: p,
        "dualpipe_v": lambda: 2 * p + 1,
        "v_half": lambda: 2 * ((p + 2) // 2),
        "v_min": lambda: 2 * ((p + 4) // 3),
        "seq1f1b": lambda: p + k - 1,
        "chimera": lambda: p if m is not None and m % p == 0 else p + 1,
    }
    if name not in formulas:
        raise ValueError(f"no activation formula for {name!r}; known: {sorted(formulas)}")
    return formulas[name]()


def peak_until_w(schedule: Schedule) -> tuple[int, ...]:
    """Per rank, the most activations held at once counting each from its F to its W (or BW): the
    controllable-memory paper's accounting, since W still reads the layer inputs."""
    return _peak_held(schedule, released_by=(Kind.W, Kind.BW))

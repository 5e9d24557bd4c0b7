"""Breadth-first looped pipelines (Lamy-Poirier 2022, "Breadth-First Pipeline Parallelism", arXiv 2211.05953).

The looped placement of interleaved 1F1B (stage s on rank s % p, v stages per rank), run breadth-first: every
microbatch through a rank's first stage, then every microbatch through its second, ...; the backward walks the
stages in reverse, again all microbatches per stage. Against the depth-first interleaved 1F1B it holds all
v * m activations (GPipe's memory), but needs no m % p == 0 and, with m >= p, has the same bubble; the paper's
point is that each stage's weight gradients are complete early (after one stage's sweep), so their data-parallel
reduction overlaps the rest of the backward.

    >>> from dtensor_plus.layouts.pipeline.schedules_looped import breadth_first
    >>> breadth_first(p=2, m=3, v=2).stage_to_rank
    (0, 1, 0, 1)
"""

from __future__ import annotations

from .actions import Action, Kind, Schedule
from .schedules import _check_counts, with_communication

__all__ = ["breadth_first"]


def breadth_first(p: int, m: int, v: int = 2) -> Schedule:
    """Looped placement, breadth-first order. Bubble with F = B = W (BW = 2F): each sweep of a stage takes m
    forwards, and a rank's next stage waits for the loop round the other p-1 ranks only when m < p, so the step
    spans (v-1) * max(m, p) + m + p - 1 forward slots each way: bubble (p-1)/(v*m + p-1) for m >= p
    (``bubble_formula``). Peak in-flight activations v*m on every rank."""
    _check_counts("breadth_first", p, m, v)
    compute = []
    for r in range(p):
        mine = [chunk * p + r for chunk in range(v)]
        order = [Action(Kind.F, s, mb) for s in mine for mb in range(m)]
        order += [Action(Kind.BW, s, mb) for s in reversed(mine) for mb in range(m)]
        compute.append(order)
    return with_communication("breadth_first", m, [s % p for s in range(v * p)], compute)

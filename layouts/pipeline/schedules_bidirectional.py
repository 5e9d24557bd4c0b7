"""Chimera's bidirectional pipelines (Li & Hoefler, SC 2021): two pipelines over the same p ranks in opposite
directions, so each one's warm-up and cool-down idle is filled by the other's work.

Stages are numbered pipeline-major (``Schedule.num_pipelines`` = 2): the down pipeline's stage s (0..p-1) on rank
s, the up pipeline's stage p+s on rank p-1-s. Both pipelines are the same model: stage p+s holds the weights of
stage s, a replica, so a rank holds two different model stages (r and p-1-r) and the weight gradients of each
model stage are summed across its two replicas before the optimizer step (``PipelineStage``'s
``shared_parameters`` with one key per weight, ``shared.py``). Microbatch mb runs down when even, up when odd.

    >>> from dtensor_plus.layouts.pipeline.schedules_bidirectional import chimera
    >>> chimera(p=2, m=4).stage_to_rank
    (0, 1, 1, 0)
"""

from __future__ import annotations

from .actions import Action, Kind, Schedule
from .schedules import _check_counts, one_f_one_b, with_communication
from .simulate import simulate

__all__ = ["chimera", "chimera_placement"]


def chimera_placement(p: int) -> list[int]:
    """stage -> rank for the down (stages 0..p-1) and up (p..2p-1) pipelines."""
    return list(range(p)) + [p - 1 - s for s in range(p)]


def chimera(p: int, m: int) -> Schedule:
    """Each pipeline runs 1F1B on its half of the microbatches; a rank runs the union of its two 1F1B lists in
    the order of their start times on a unit-cost timeline (F = BW, the paper's assumption), down first on a tie.

    With F = BW the bubble is (p-2)/(2m+p-2) (Chimera's, D = p stages, N = m microbatches) for even p and
    m >= p + 2; at m == p (the paper's basic unit, which it schedules by hand) this order idles one slot more.
    Peak in-flight activations p+1 on the middle ranks for m >= p + 2 (1F1B: p; GPipe: m).
    """
    _check_counts("chimera", p, m)
    if p % 2 or m < 2:
        raise ValueError(f"chimera: needs an even number of ranks (got p={p}: the two directions pair rank r with "
                         f"p-1-r) and m >= 2 microbatches (got m={m}), one per direction at least")
    stage_to_rank = chimera_placement(p)
    timed: list[list[tuple[float, int, Action]]] = [[] for _ in range(p)]
    for pipeline, count in enumerate(((m + 1) // 2, m // 2)):
        one_way = simulate(one_f_one_b(p, count), {Kind.F: 1.0, Kind.BW: 1.0})
        for e in one_way.events:
            a = e.action
            if a.kind.is_compute:
                stage = a.stage + pipeline * p
                mb = 2 * a.microbatch + pipeline
                timed[stage_to_rank[stage]].append((e.start, pipeline, Action(a.kind, stage, mb)))
    compute = [[a for _, _, a in sorted(events, key=lambda x: x[:2])] for events in timed]
    return with_communication("chimera", m, stage_to_rank, compute, num_pipelines=2)

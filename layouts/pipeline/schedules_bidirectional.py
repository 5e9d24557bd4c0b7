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
from .list_schedule import list_schedule
from .schedules import _check_counts, one_f_one_b, with_communication
from .simulate import simulate

__all__ = ["chimera", "chimera_placement"]


def chimera_placement(p: int) -> list[int]:
    """stage -> rank for the down (stages 0..p-1) and up (p..2p-1) pipelines."""
    return list(range(p)) + [p - 1 - s for s in range(p)]


def chimera(p: int, m: int) -> Schedule:
    """Two orders, each reaching Chimera's bubble (p-2)/(2m+p-2) (D = p stages, N = m microbatches, F = BW: the
    paper's T_F = T_B) where the other one does not:

    - m a multiple of p (the paper's basic unit of D microbatches, repeated): unit-time list scheduling of both
      directions together (``list_schedule``: a ready backward first, else the oldest ready forward); peak
      in-flight activations p, the top of the paper's [p/2+1, p];
    - otherwise each pipeline runs 1F1B on its half of the microbatches and a rank runs the union of its two
      1F1B lists in the order of their start times on a unit-cost timeline, down first on a tie; exact for even
      m >= p + 2, peak p+1 on the middle ranks (1F1B: p; GPipe: m). The list scheduler idles more there
      (its directions drift apart once a unit is cut short).
    """
    _check_counts("chimera", p, m)
    if p % 2 or m < 2:
        raise ValueError(f"chimera: needs an even number of ranks (got p={p}: the two directions pair rank r with "
                         f"p-1-r) and m >= 2 microbatches (got m={m}), one per direction at least")
    stage_to_rank = chimera_placement(p)
    if m % p == 0:
        compute = list_schedule(stage_to_rank, m, max_in_flight=2 * m, num_pipelines=2, fused=True)
        return with_communication("chimera", m, stage_to_rank, compute, num_pipelines=2)
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

"""Unit-time list scheduling: the compute order of each rank, read off a simulated timeline of unit-cost actions.

The zero-bubble papers build their V schedules with a greedy scheduler of this kind; ZB-V, V-Half and V-Min are
this one procedure with different memory limits. Any order read off a feasible timeline is a topological order
of the step's dependencies, so it is deadlock-free for any costs; the costs only decide how good it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from .actions import Action, Kind

F, B, W, BW = Kind.F, Kind.B, Kind.W, Kind.BW

__all__ = ["list_schedule"]


def list_schedule(stage_to_rank: Sequence[int], m: int, max_in_flight: int, *,
                  release_at_w: bool = False, num_pipelines: int = 1, fused: bool = False) -> list[list[Action]]:
    """Each rank's compute order (F, B, W; or F and BW with ``fused``, each BW one time step like an F: Chimera's
    T_F = T_B). Every action takes one time step; a free rank runs, by priority:

    1. a ready B (oldest microbatch first, then the later stage): it unblocks the rank upstream;
    2. a ready F (later stage first, so a microbatch reaches the loss soon), only within ``max_in_flight`` of
       this rank's held (stage, microbatch) activations: a microbatch's first F on a rank needs room for itself
       and its F's on this rank's later stages too (a V rank's way back), so a rank full of way-down forwards
       always has room for the way-back forward that lets it drain: memory stays bounded without deadlock;
    3. the oldest pending W: W depends on nothing remote, so it fills what would be a bubble.

    An activation is held from its F to its B, or to its W with ``release_at_w`` (W still reads the layer inputs:
    the controllable-memory paper's accounting). ``num_pipelines``: stages pipeline-major as in ``Schedule``,
    microbatch mb through pipeline mb % num_pipelines only (Chimera's two directions).
    """
    num_stages, num_ranks = len(stage_to_rank), max(stage_to_rank) + 1
    per_pipeline = num_stages // num_pipelines
    # each stage's microbatches in the order it runs them: those of its pipeline
    mine = [list(range(s // per_pipeline, m, num_pipelines)) for s in range(num_stages)]
    stages = [[s for s in range(num_stages) if stage_to_rank[s] == r] for r in range(num_ranks)]
    done: dict[tuple[Kind, int, int], int] = {}  # (kind, stage, mb) -> time step it finished
    next_f, next_b = [0] * num_stages, [0] * num_stages
    pending_w: list[list[tuple[int, int]]] = [[] for _ in range(num_ranks)]
    in_flight = [0] * num_ranks  # activations held
    # F on stage s: how many of this rank's stages the microbatch passes from s on: the room its first F (entry) needs
    pipeline_stages = [range(s - s % per_pipeline, s - s % per_pipeline + per_pipeline) for s in range(num_stages)]
    ahead = [sum(1 for t in pipeline_stages[s] if t >= s and stage_to_rank[t] == stage_to_rank[s])
             for s in range(num_stages)]
    entry = [all(stage_to_rank[t] != stage_to_rank[s] for t in pipeline_stages[s] if t < s)
             for s in range(num_stages)]
    first = [s % per_pipeline == 0 for s in range(num_stages)]
    last = [s % per_pipeline == per_pipeline - 1 for s in range(num_stages)]
    backward = BW if fused else B

    def forward_rank(s: int, mb: int) -> tuple[int, int]:
        """One pipeline: the later stage first. Several: the oldest microbatch first, so the directions alternate."""
        return (-s, mb) if num_pipelines == 1 else (mb, -s)
    orders: list[list[Action]] = [[] for _ in range(num_ranks)]

    def finished(key, t):
        return done.get(key, t + 1) <= t

    def pick(r: int, t: int) -> Action | None:
        ready_b = [  # a stage's B's become ready in microbatch order, like its F's
            (mine[s][next_b[s]], -s) for s in stages[r]
            if next_b[s] < len(mine[s]) and finished((F, s, mine[s][next_b[s]]), t)
            and (last[s] or finished((backward, s + 1, mine[s][next_b[s]]), t))
        ]
        if ready_b:
            mb, neg_s = min(ready_b)
            return Action(backward, -neg_s, mb)
        ready_f = [
            (forward_rank(s, mine[s][next_f[s]]), s, mine[s][next_f[s]]) for s in stages[r]
            if next_f[s] < len(mine[s]) and in_flight[r] + (ahead[s] if entry[s] else 1) <= max_in_flight
            and (first[s] or finished((F, s - 1, mine[s][next_f[s]]), t))
        ]
        if ready_f:
            _, s, mb = min(ready_f)
            return Action(F, s, mb)
        if pending_w[r]:
            s, mb = pending_w[r].pop(0)
            return Action(W, s, mb)
        return None

    total, t = sum(map(len, mine)) * (2 if fused else 3), 0
    while len(done) < total:
        if t > 4 * total:  # every time step runs at least one action unless the priorities deadlock
            raise RuntimeError(f"list scheduling stuck at t={t} with {len(done)}/{total} actions placed "
                               f"(max_in_flight={max_in_flight} too small for this placement?)")
        for r in range(num_ranks):
            if orders[r] and done[(orders[r][-1].kind, orders[r][-1].stage, orders[r][-1].microbatch)] > t:
                continue  # busy until then
            a = pick(r, t)
            if a is None:
                continue
            orders[r].append(a)
            done[(a.kind, a.stage, a.microbatch)] = t + 1
            if a.kind is F:
                next_f[a.stage] += 1
                in_flight[r] += 1
            elif a.kind is BW:
                next_b[a.stage] += 1
                in_flight[r] -= 1
            elif a.kind is B:
                next_b[a.stage] += 1
                pending_w[r].append((a.stage, a.microbatch))
                if not release_at_w:
                    in_flight[r] -= 1
            elif release_at_w:
                in_flight[r] -= 1
        t += 1
    return orders

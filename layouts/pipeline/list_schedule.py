"""Unit-time list scheduling: the compute order of each rank, read off a simulated timeline of unit-cost actions.

The zero-bubble papers build their V schedules with a greedy scheduler of this kind; ZB-V, V-Half, V-Min and
Chimera's bidirectional pipelines are all this one procedure with different placements and memory limits. Any
order read off a feasible timeline is a topological order of the step's dependencies, so it is deadlock-free
for any costs; the costs only decide how good it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from .actions import Action, Kind

F, B, W, BW = Kind.F, Kind.B, Kind.W, Kind.BW

__all__ = ["list_schedule"]


def list_schedule(stage_to_rank: Sequence[int], m: int, max_in_flight: int, *, num_pipelines: int = 1,
                  fused_backward: bool = False, release_at_w: bool = False, forward_first: bool = False
                  ) -> list[list[Action]]:
    """Each rank's compute order. Every F, B, W (or BW) takes one time step; a free rank runs, by priority:

    1. a ready backward (oldest microbatch first, then the later stage): it unblocks the rank upstream;
    2. a ready F (later stage first, so a microbatch reaches the loss soon), only within ``max_in_flight`` of
       this rank's (stage, microbatch) activations: a microbatch's first F on a rank commits room for its F's on
       every stage of this rank it will pass (a V rank's way back), so a rank full of way-down forwards never
       blocks the way-back forward that would let it drain: this bounds memory without deadlock;
    3. the oldest pending W: W depends on nothing remote, so it fills what would be a bubble.

    An activation is held from its F to its B, or to its W with ``release_at_w`` (W still reads the layer inputs:
    the controllable-memory paper's accounting). ``fused_backward``: BW instead of B and W (no split).
    ``num_pipelines``: independent chains, stage numbers pipeline-major, microbatch mb in pipeline
    mb % num_pipelines (``Schedule``'s convention).
    """
    num_stages, num_ranks = len(stage_to_rank), max(stage_to_rank) + 1
    per_pipeline = num_stages // num_pipelines
    stages = [[s for s in range(num_stages) if stage_to_rank[s] == r] for r in range(num_ranks)]
    # each stage's microbatches, in the order they pass through it
    queue = [[mb for mb in range(m) if mb % num_pipelines == s // per_pipeline] for s in range(num_stages)]
    backward = BW if fused_backward else B
    done: dict[tuple[Kind, int, int], int] = {}  # (kind, stage, mb) -> time step it finished
    next_f, next_b = [0] * num_stages, [0] * num_stages
    pending_w: list[list[tuple[int, int]]] = [[] for _ in range(num_ranks)]
    in_flight = [0] * num_ranks  # activations held or committed (for a later stage of this rank)
    # for F on stage s: how many of this rank's stages the microbatch will pass from s on (committed at the first)
    ahead = [sum(1 for t in range(s, (s // per_pipeline + 1) * per_pipeline) if stage_to_rank[t] == stage_to_rank[s])
             for s in range(num_stages)]
    entry = [s % per_pipeline == 0 or stage_to_rank[s - 1] != stage_to_rank[s] and
             all(stage_to_rank[t] != stage_to_rank[s] for t in range(s // per_pipeline * per_pipeline, s))
             for s in range(num_stages)]
    orders: list[list[Action]] = [[] for _ in range(num_ranks)]

    def finished(key, t):
        return done.get(key, t + 1) <= t

    def is_last(s):
        return s % per_pipeline == per_pipeline - 1

    def pick(r: int, t: int) -> Action | None:
        ready_b = []
        for s in stages[r]:
            if next_b[s] < len(queue[s]):
                mb = queue[s][next_b[s]]
                if finished((F, s, mb), t) and (is_last(s) or finished((backward, s + 1, mb), t)):
                    ready_b.append((mb, -s))
        if ready_b and not forward_first:
            mb, neg_s = min(ready_b)
            return Action(backward, -neg_s, mb)
        ready_f = []
        for s in stages[r]:
            if next_f[s] < len(queue[s]) and (not entry[s] or in_flight[r] + ahead[s] <= max_in_flight):
                mb = queue[s][next_f[s]]
                if s % per_pipeline == 0 or finished((F, s - 1, mb), t):
                    ready_f.append((-s, mb))
        if ready_f:
            neg_s, mb = min(ready_f)
            return Action(F, -neg_s, mb)
        if ready_b:
            mb, neg_s = min(ready_b)
            return Action(backward, -neg_s, mb)
        if pending_w[r]:
            s, mb = pending_w[r].pop(0)
            return Action(W, s, mb)
        return None

    total = (2 if fused_backward else 3) * sum(len(q) for q in queue)
    t = 0
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
                in_flight[r] += ahead[a.stage] if entry[a.stage] else 0
            elif a.kind is backward:
                next_b[a.stage] += 1
                if a.kind is B:
                    pending_w[r].append((a.stage, a.microbatch))
                if not release_at_w or a.kind is BW:
                    in_flight[r] -= 1
            else:  # W
                if release_at_w:
                    in_flight[r] -= 1
        t += 1
    return orders

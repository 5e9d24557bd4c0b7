"""Unit-time list scheduling: the compute order of each rank, read off a simulated timeline of unit-cost actions.

The zero-bubble papers build their V schedules with a greedy scheduler of this kind; ZB-V, V-Half and V-Min are
this one procedure with different memory limits. Any order read off a feasible timeline is a topological order
of the step's dependencies, so it is deadlock-free for any costs; the costs only decide how good it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from .actions import Action, Kind

F, B, W = Kind.F, Kind.B, Kind.W

__all__ = ["list_schedule"]


def list_schedule(stage_to_rank: Sequence[int], m: int, max_in_flight: int, *,
                  release_at_w: bool = False) -> list[list[Action]]:
    """Each rank's compute order (F, B, W). Every action takes one time step; a free rank runs, by priority:

    1. a ready B (oldest microbatch first, then the later stage): it unblocks the rank upstream;
    2. a ready F (later stage first, so a microbatch reaches the loss soon), only within ``max_in_flight`` of
       this rank's held (stage, microbatch) activations: a microbatch's first F on a rank needs room for itself
       and its F's on this rank's later stages too (a V rank's way back), so a rank full of way-down forwards
       always has room for the way-back forward that lets it drain: memory stays bounded without deadlock;
    3. the oldest pending W: W depends on nothing remote, so it fills what would be a bubble.

    An activation is held from its F to its B, or to its W with ``release_at_w`` (W still reads the layer inputs:
    the controllable-memory paper's accounting).
    """
    num_stages, num_ranks = len(stage_to_rank), max(stage_to_rank) + 1
    stages = [[s for s in range(num_stages) if stage_to_rank[s] == r] for r in range(num_ranks)]
    done: dict[tuple[Kind, int, int], int] = {}  # (kind, stage, mb) -> time step it finished
    next_f, next_b = [0] * num_stages, [0] * num_stages
    pending_w: list[list[tuple[int, int]]] = [[] for _ in range(num_ranks)]
    in_flight = [0] * num_ranks  # activations held
    # F on stage s: how many of this rank's stages the microbatch passes from s on: the room its first F (entry) needs
    ahead = [sum(1 for t in range(s, num_stages) if stage_to_rank[t] == stage_to_rank[s]) for s in range(num_stages)]
    entry = [all(stage_to_rank[t] != stage_to_rank[s] for t in range(s)) for s in range(num_stages)]
    orders: list[list[Action]] = [[] for _ in range(num_ranks)]

    def finished(key, t):
        return done.get(key, t + 1) <= t

    def pick(r: int, t: int) -> Action | None:
        ready_b = [  # a stage's B's become ready in microbatch order, like its F's
            (next_b[s], -s) for s in stages[r]
            if next_b[s] < m and finished((F, s, next_b[s]), t)
            and (s == num_stages - 1 or finished((B, s + 1, next_b[s]), t))
        ]
        if ready_b:
            mb, neg_s = min(ready_b)
            return Action(B, -neg_s, mb)
        ready_f = [
            (-s, next_f[s]) for s in stages[r]
            if next_f[s] < m and in_flight[r] + (ahead[s] if entry[s] else 1) <= max_in_flight
            and (s == 0 or finished((F, s - 1, next_f[s]), t))
        ]
        if ready_f:
            neg_s, mb = min(ready_f)
            return Action(F, -neg_s, mb)
        if pending_w[r]:
            s, mb = pending_w[r].pop(0)
            return Action(W, s, mb)
        return None

    total, t = 3 * num_stages * m, 0
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
            elif a.kind is B:
                next_b[a.stage] += 1
                pending_w[r].append((a.stage, a.microbatch))
                if not release_at_w:
                    in_flight[r] -= 1
            elif release_at_w:
                in_flight[r] -= 1
        t += 1
    return orders

"""A schedule as one microbatch's building block repeated every T slots (Qi et al. 2024, "Pipeline Parallelism with
Controllable Memory", section 3): the framework behind V-Min and V-Half.

One block places a single microbatch's F, B and W on every stage at integer times (one slot each, the paper's
T_F = T_B = T_W); microbatch i runs the same block shifted by i * T, where T is a rank's work per microbatch
(3 slots per stage it holds). Two rules make the repetition a valid schedule:

- dependencies inside the block: F of stage s at least ``gap`` slots after F of s-1, B of s after B of s+1 (the
  last stage's B after its own F), W after B;
- no collision between blocks: the actions of one rank take distinct times modulo T, so shifted copies never
  overlap.

Each rank then runs its actions in the order of their times; the simulator's replay starts each as soon as
its inputs are there, which is the paper's "squeeze" of the warm-up. A stage's activations live from F to W, so
the lifespans inside the block fix the peak memory (the paper's point): small gaps, short lifespans, little memory.

    >>> from dtensor_plus.layouts.pipeline.schedules_v import v_placement
    >>> block = block_times(v_placement(2), forward_gaps=[1] * 4, backward_gaps=[1] * 4)
    >>> [block[(Kind.F, s)] for s in range(4)], [block[(Kind.B, s)] for s in range(4)]
    ([0, 1, 2, 3], [7, 6, 5, 4])
"""

from __future__ import annotations

from collections.abc import Sequence

from .actions import Action, Kind

F, B, W = Kind.F, Kind.B, Kind.W

__all__ = ["block_times", "repeat_block"]


def block_times(stage_to_rank: Sequence[int], forward_gaps: Sequence[int],
                backward_gaps: Sequence[int]) -> dict[tuple[Kind, int], int]:
    """Times of one microbatch's (kind, stage) actions in the block, every rank's free slots modulo its T.

    ``forward_gaps[s]``: the fewest slots from F of stage s-1 to F of stage s (entry 0 unused);
    ``backward_gaps[s]``: from B of stage s+1 to B of stage s (the last entry unused). 1 is back-to-back; a
    larger gap lengthens the lifespans (more memory) and lets forwards run further ahead of their backwards.
    Each action goes to the first time at or after its earliest whose slot modulo T is still free on its rank,
    W as soon after its B as a slot is free. Stages on one rank next to each other (the V's turn) keep gap 1.
    """
    num_stages = len(stage_to_rank)
    if len(forward_gaps) != num_stages or len(backward_gaps) != num_stages or min(*forward_gaps, *backward_gaps) < 1:
        raise ValueError(f"forward_gaps and backward_gaps need one int >= 1 per stage ({num_stages}); got "
                         f"{list(forward_gaps)} and {list(backward_gaps)}")
    period = _period(stage_to_rank)
    taken: dict[int, set[int]] = {r: set() for r in set(stage_to_rank)}  # slots modulo T
    times: dict[tuple[Kind, int], int] = {}

    def place(kind: Kind, stage: int, earliest: int) -> None:
        rank, t = stage_to_rank[stage], earliest
        while t % period in taken[rank]:
            t += 1
        taken[rank].add(t % period)
        times[(kind, stage)] = t

    def gap(gaps: Sequence[int], stage: int, neighbour: int) -> int:
        return 1 if stage_to_rank[stage] == stage_to_rank[neighbour] else gaps[stage]

    for s in range(num_stages):
        place(F, s, 0 if s == 0 else times[(F, s - 1)] + gap(forward_gaps, s, s - 1))
    for s in reversed(range(num_stages)):
        after = times[(F, s)] + 1 if s == num_stages - 1 else times[(B, s + 1)] + gap(backward_gaps, s, s + 1)
        place(B, s, after)
    for s in sorted(range(num_stages), key=lambda s: times[(B, s)]):
        place(W, s, times[(B, s)] + 1)
    return times


def repeat_block(stage_to_rank: Sequence[int], m: int, block: dict[tuple[Kind, int], int]) -> list[list[Action]]:
    """Each rank's compute order: the block once per microbatch, microbatch i shifted by i * T, sorted by time.

    Any order sorted by the times of a collision-free timeline that keeps every dependency is a topological order
    of the step, so the schedule is deadlock-free for any costs (``validate`` checks it all the same).
    """
    period = _period(stage_to_rank)
    timed: dict[int, list[tuple[int, Action]]] = {r: [] for r in range(max(stage_to_rank) + 1)}
    for (kind, stage), t in block.items():
        rank = stage_to_rank[stage]
        timed[rank] += [(t + mb * period, Action(kind, stage, mb)) for mb in range(m)]
    return [[a for _, a in sorted(timed[r], key=lambda x: x[0])] for r in sorted(timed)]


def _period(stage_to_rank: Sequence[int]) -> int:
    """T: one slot each for F, B and W of every stage a rank holds, i.e. its work for one microbatch. Every rank
    must hold as many stages, or the blocks of a lighter rank could not repeat in step with the others."""
    counts = {list(stage_to_rank).count(r) for r in set(stage_to_rank)}
    if len(counts) != 1:
        raise ValueError(f"a building block repeats only when every rank holds as many stages; stage_to_rank "
                         f"{list(stage_to_rank)} gives ranks {sorted(counts)} stages")
    return 3 * counts.pop()

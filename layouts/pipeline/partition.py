"""Balanced pipeline stages: cut a model's layer sequence into stages, choosing each stage's recomputation, so
that the step is short and every rank's memory fits.

A model is a sequence of layers (a GPT: the embedding, the blocks, the final norm with the head and the loss),
each with a cost (``LayerCost``: forward and backward time, state bytes, activation bytes kept per microbatch
under each recomputation policy; ``layer_costs.py`` measures or simulates them). A stage is a run of consecutive
layers on one pipeline rank, with one recomputation policy ("none", "full", "selective", as
``layouts/recompute.py`` applies them to the stage's modules).

What a stage costs in a schedule (gpipe or 1f1b, one stage per rank):

- time: F = the sum of its layers' forward times, BW = the sum of their backward times plus what the policy
  recomputes (an extra forward of the recomputed part);
- memory (BPipe's point: 1F1B's first stage keeps p microbatches of activations alive, its last one):
  state + in_flight(stage) x (activation bytes kept per microbatch) + the largest one layer re-creates while it
  is recomputed, where in_flight is ``simulate.peak_in_flight`` of the schedule: p - s for 1F1B's stage s, m
  for GPipe's every stage.

The search (AdaPipe's joint recomputation and partitioning, by dynamic programming). For a stage of layers
[i, j) at position s the best policy is the fastest whose memory fits the cap (it lowers both the slowest stage
and the sum), so each (s, i, j) has one time c(s, i, j). DAPPLE's and AdaPipe's step-time formula is
sum_s c_s + (m - 1) max_s c_s (every microbatch crosses every stage once, the slowest stage sets the pace); it
is an estimate, not a bound: GPipe takes sum F + sum BW + (m - 1)(max F + max BW), more when the slowest forward
and the slowest backward sit on different stages. For each candidate bottleneck T (every distinct c, from the
smallest), a DP over (stage, last layer) finds the cuts with the least sum whose every stage is at most T: the
(max, sum) Pareto front, whose best point minimises the formula exactly (objective "formula"; T stops once
(m - 1) T plus the least possible sum passes the best formula found). Objective "simulated" (default)
minimises the schedule simulator's step (``simulate.py``, each stage's F and BW) exactly: the front's best
simulated point is the first incumbent of a branch and bound over the cuts, whose lower bound per stage is what
microbatch 0 needs to reach it, its m forwards and backwards, and the last gradient's way back
(``_branch_and_bound``; the tests check the bound never passes the simulator).

    costs = layer_costs.simulated(build)                    # or layer_costs.measured(...)
    plan = partition_layers(costs, num_stages=4, n_microbatches=8, memory_cap=2 << 30)
    plan.boundaries      # (0, 3, 7, 11, 14): stage s holds layers boundaries[s]:boundaries[s + 1]
    plan.policies        # ("full", "full", "none", "none")
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .actions import Kind
from .simulate import peak_in_flight, simulate
from .validate import validate

__all__ = ["LayerCost", "Partition", "partition_layers", "evaluate_partition", "least_peak_memory", "POLICIES",
           "SUPPORTED_SCHEDULES"]

POLICIES = ("none", "full", "selective")
SUPPORTED_SCHEDULES = ("gpipe", "1f1b")  # one stage per rank, fused backward (F and BW costs)


@dataclass(frozen=True)
class LayerCost:
    """One layer, one microbatch.

    forward, backward: time (any unit, the same for every layer: seconds, or FLOPs over a rate).
    state_bytes: parameters, gradients and optimizer state the layer's rank holds for it.
    activation_bytes: {policy: bytes autograd keeps for this layer from its forward to its backward}; "none"
        is required, a policy missing means the policy does not apply to this layer (it runs as "none").
    recompute: {policy: time added to the backward by recomputation} (0 for "none").
    transient_bytes: {policy: bytes re-created while the layer is recomputed in backward} (0 for "none").
    """

    name: str
    forward: float
    backward: float
    state_bytes: int = 0
    activation_bytes: Mapping[str, int] = field(default_factory=lambda: {"none": 0})
    recompute: Mapping[str, float] = field(default_factory=dict)
    transient_bytes: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if "none" not in self.activation_bytes:
            raise ValueError(f"LayerCost {self.name!r}: activation_bytes needs a 'none' entry (bytes kept without "
                             f"recomputation), got {dict(self.activation_bytes)}")
        unknown = (set(self.activation_bytes) | set(self.recompute) | set(self.transient_bytes)) - set(POLICIES)
        if unknown:
            raise ValueError(f"LayerCost {self.name!r}: unknown policies {sorted(unknown)}; known: {POLICIES}")
        numbers = [self.forward, self.backward, self.state_bytes, *self.activation_bytes.values(),
                   *self.recompute.values(), *self.transient_bytes.values()]
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in numbers):
            raise ValueError(f"LayerCost {self.name!r}: times and bytes must be finite and >= 0, got {self}")

    def kept(self, policy: str) -> int:
        return self.activation_bytes.get(policy, self.activation_bytes["none"])

    def extra(self, policy: str) -> float:
        return self.recompute.get(policy, 0.0) if policy in self.activation_bytes else 0.0

    def transient(self, policy: str) -> int:
        return self.transient_bytes.get(policy, 0) if policy in self.activation_bytes else 0


@dataclass(frozen=True)
class Partition:
    """Stages of a layer sequence and what they cost.

    boundaries: num_stages + 1 layer indices, from 0 to the layer count: stage s holds layers
    ``boundaries[s]:boundaries[s + 1]``. policies: each stage's recomputation. forward / backward: each stage's F
    and BW time (BW with the recomputation). memory: each stage's peak bytes; in_flight: microbatches whose
    activations it keeps at once. step_time and bubble: the schedule simulator's (equal microbatches, no
    communication time); formula: sum + (m - 1) max of the stages' F + BW (DAPPLE's, AdaPipe's estimate).
    """

    boundaries: tuple[int, ...]
    policies: tuple[str, ...]
    forward: tuple[float, ...]
    backward: tuple[float, ...]
    memory: tuple[int, ...]
    in_flight: tuple[int, ...]
    step_time: float
    bubble: float
    formula: float
    schedule: str
    n_microbatches: int

    @property
    def num_stages(self) -> int:
        return len(self.policies)

    @property
    def peak_memory(self) -> int:
        return max(self.memory)

    def layers_of(self, stage: int) -> range:
        return range(self.boundaries[stage], self.boundaries[stage + 1])


def _check(costs, num_stages, n_microbatches, schedule):
    costs = tuple(costs)
    if not costs or not all(isinstance(c, LayerCost) for c in costs):
        raise TypeError(f"costs must be a non-empty sequence of LayerCost, got {costs!r}")
    if not isinstance(num_stages, int) or not 1 <= num_stages <= len(costs):
        raise ValueError(f"num_stages must be an int in [1, {len(costs)}] (every stage holds at least one layer of "
                         f"the {len(costs)}), got {num_stages!r}")
    if not isinstance(n_microbatches, int) or n_microbatches < 1:
        raise ValueError(f"n_microbatches must be an int >= 1, got {n_microbatches!r}")
    if schedule not in SUPPORTED_SCHEDULES:
        raise ValueError(f"partition_layers balances {SUPPORTED_SCHEDULES} (one stage per rank, fused backward); got "
                         f"{schedule!r}. For interleaved or zero-bubble schedules cut with one of these and reuse "
                         f"the boundaries")
    return costs


def _build(schedule: str, num_stages: int, n_microbatches: int):
    """The schedule, validated once here: the search replays it under many cost tables (``validated=True``)."""
    from .schedules import SCHEDULES

    plan = SCHEDULES[schedule](p=num_stages, m=n_microbatches)
    validate(plan)
    return plan


class _Stages:
    """Prefix sums over the layers: any stage's time and memory in O(layers it holds) at most."""

    def __init__(self, costs: tuple[LayerCost, ...], policies: tuple[str, ...], in_flight: tuple[int, ...]):
        self.costs, self.policies, self.in_flight = costs, policies, in_flight
        self.forward = [0.0, *itertools.accumulate(c.forward for c in costs)]
        self.backward = [0.0, *itertools.accumulate(c.backward for c in costs)]
        self.state = [0, *itertools.accumulate(c.state_bytes for c in costs)]
        self.kept = {p: [0, *itertools.accumulate(c.kept(p) for c in costs)] for p in policies}
        self.extra = {p: [0.0, *itertools.accumulate(c.extra(p) for c in costs)] for p in policies}

    def memory(self, stage: int, i: int, j: int, policy: str) -> int:
        transient = max(c.transient(policy) for c in self.costs[i:j])
        return (self.state[j] - self.state[i] + self.in_flight[stage] * (self.kept[policy][j] - self.kept[policy][i])
                + transient)

    def times(self, i: int, j: int, policy: str) -> tuple[float, float]:
        return (self.forward[j] - self.forward[i],
                self.backward[j] - self.backward[i] + self.extra[policy][j] - self.extra[policy][i])

    def best(self, stage: int, i: int, j: int, cap: float) -> tuple[float, str] | None:
        """(F + BW, policy) of the fastest policy whose memory fits ``cap`` (ties: the earlier policy), or None."""
        fits = [(sum(self.times(i, j, p)), p) for p in self.policies if self.memory(stage, i, j, p) <= cap]
        return min(fits, key=lambda tp: tp[0]) if fits else None


def least_peak_memory(costs: Sequence[LayerCost], num_stages: int, n_microbatches: int, *, schedule: str = "1f1b",
                      policies: Sequence[str] = POLICIES) -> int:
    """The smallest ``memory_cap`` any partition into ``num_stages`` stages fits (recomputing by ``policies``)."""
    costs = _check(costs, num_stages, n_microbatches, schedule)
    in_flight = peak_in_flight(_build(schedule, num_stages, n_microbatches))
    stages = _Stages(costs, tuple(dict.fromkeys(policies)), in_flight)
    return _least_peak_memory(stages, len(costs), num_stages)


def evaluate_partition(costs: Sequence[LayerCost], boundaries: Sequence[int], n_microbatches: int, *,
                       policies: Sequence[str] | None = None, schedule: str = "1f1b") -> Partition:
    """What the given cuts cost (e.g. an even split, to hold a balanced one against): times, memory, simulated
    step. ``policies``: one per stage (default: "none" everywhere)."""
    boundaries = tuple(boundaries)
    costs = _check(costs, max(len(boundaries) - 1, 1), n_microbatches, schedule)
    num_stages = len(boundaries) - 1
    if num_stages < 1 or boundaries[0] != 0 or boundaries[-1] != len(costs) or any(
            a >= b for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries must rise strictly from 0 to the layer count {len(costs)} (every stage "
                         f"non-empty), got {boundaries}")
    policies = tuple(policies) if policies is not None else ("none",) * num_stages
    if len(policies) != num_stages or any(p not in POLICIES for p in policies):
        raise ValueError(f"policies must name one of {POLICIES} per stage ({num_stages}), got {policies}")
    plan = _build(schedule, num_stages, n_microbatches)
    stages = _Stages(costs, tuple(sorted(set(policies))), peak_in_flight(plan))
    return _evaluated(stages, plan, boundaries, policies, schedule, n_microbatches)


def _evaluated(stages: _Stages, plan, boundaries, policies, schedule, m) -> Partition:
    spans = list(zip(boundaries, boundaries[1:]))
    times = [stages.times(i, j, p) for (i, j), p in zip(spans, policies)]
    memory = tuple(stages.memory(s, i, j, p) for s, ((i, j), p) in enumerate(zip(spans, policies)))
    sim_costs = {}
    for s, (f, bw) in enumerate(times):
        sim_costs[(Kind.F, s)], sim_costs[(Kind.BW, s)] = f, bw
    sim = simulate(plan, sim_costs, validated=True)  # _build validated plan
    totals = [f + bw for f, bw in times]
    return Partition(tuple(boundaries), tuple(policies), tuple(f for f, _ in times), tuple(bw for _, bw in times),
                     memory, tuple(stages.in_flight), sim.step_time, sim.bubble, sum(totals) + (m - 1) * max(totals),
                     schedule, m)


def partition_layers(costs: Sequence[LayerCost], num_stages: int, n_microbatches: int, *, schedule: str = "1f1b",
                     memory_cap: float | None = None, policies: Sequence[str] = POLICIES,
                     objective: str = "simulated") -> Partition:
    """The cuts of ``costs`` into ``num_stages`` stages and each stage's recomputation ``policies`` (the ones
    allowed) that minimise the step time of ``schedule`` with ``n_microbatches``, every stage's peak memory at
    most ``memory_cap`` bytes (None: no cap).

    ``objective``: "formula" minimises sum + (m - 1) max of the stages' F + BW exactly (the DP); "simulated"
    (default) minimises the schedule simulator's step exactly (the DP's front, then branch and bound). Raises
    ValueError naming the least peak memory any partition reaches when none fits.
    """
    costs = _check(costs, num_stages, n_microbatches, schedule)
    policies = tuple(dict.fromkeys(policies))
    if not policies or any(p not in POLICIES for p in policies):
        raise ValueError(f"policies must be a non-empty subset of {POLICIES}, got {policies}")
    if objective not in ("simulated", "formula"):
        raise ValueError(f"objective must be 'simulated' or 'formula', got {objective!r}")
    cap = math.inf if memory_cap is None else memory_cap
    plan = _build(schedule, num_stages, n_microbatches)
    stages = _Stages(costs, policies, peak_in_flight(plan))
    n = len(costs)
    cell = _fastest_fitting(stages, n, num_stages, cap)
    front = _pareto_front(cell, n, num_stages, n_microbatches)
    if not front:
        least = _least_peak_memory(stages, n, num_stages)
        raise ValueError(
            f"no partition of {n} layers into {num_stages} stages fits memory_cap={memory_cap} bytes per rank under "
            f"{schedule} with {n_microbatches} microbatches (policies {policies}): the least peak any partition "
            f"reaches is {least} bytes. Raise memory_cap to at least that, allow recomputation (policies 'full' / "
            f"'selective'), use more stages, or fewer microbatches in flight (gpipe keeps all m)")
    evaluated = [_evaluated(stages, plan, cuts, _policies(cell, cuts), schedule, n_microbatches) for cuts in front]
    if objective == "formula":
        return min(evaluated, key=lambda part: (part.formula, part.step_time))
    best = min(evaluated, key=lambda part: (part.step_time, part.formula))
    return _branch_and_bound(stages, cell, plan, best)


def _fastest_fitting(stages: _Stages, n: int, p: int, cap: float) -> dict:
    """{(s, i, j): (F + BW, policy)} of the fastest policy fitting ``cap`` for stage s holding layers [i, j),
    where s <= i < j <= n - (p - 1 - s) so that every later stage keeps a layer."""
    cell = {}
    for s in range(p):
        for i in range(s, n - p + s + 1):
            for j in range(i + 1, n - p + s + 2):
                found = stages.best(s, i, j, cap)
                if found is not None:
                    cell[s, i, j] = found
    return cell


def _policies(cell: dict, cuts: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(cell[s, i, j][1] for s, (i, j) in enumerate(zip(cuts, cuts[1:])))


def _pareto_front(cell: dict, n: int, p: int, m: int) -> list[tuple[int, ...]]:
    """For each bottleneck T (from the smallest), the cuts with the least sum of stage times, every stage at most
    T, while they can still lower the formula sum + (m - 1) T: the formula's minimiser is among them."""
    by_stage = [[(i, j, cell[s, i, j][0]) for (stage, i, j) in cell if stage == s] for s in range(p)]
    least_sum = _min_sum(by_stage, n, p, math.inf)
    if least_sum is None:
        return []
    front, sums, best_formula = [], [], math.inf
    for bottleneck in sorted({t for t, _ in cell.values()}):
        if (m - 1) * bottleneck + least_sum[0] > best_formula:
            break  # every larger bottleneck puts the formula above the best found
        found = _min_sum(by_stage, n, p, bottleneck)
        if found is None or (sums and found[0] >= sums[-1]):
            continue  # infeasible, or no smaller sum than a smaller bottleneck gave: not on the front
        total, cuts = found
        front.append(cuts)
        sums.append(total)
        slowest = max(cell[s, i, j][0] for s, (i, j) in enumerate(zip(cuts, cuts[1:])))
        best_formula = min(best_formula, total + (m - 1) * slowest)
    return front


def _branch_and_bound(stages: _Stages, cell: dict, plan, incumbent: Partition) -> Partition:
    """The cuts with the shortest simulated step, exactly: a depth-first walk over the cuts, stage by stage,
    dropping every branch whose lower bound is no better than the best simulated so far (``incumbent`` at first).

    The fastest fitting policy per stage is optimal here too: a replay of fixed per-rank orders never ends
    earlier when an action takes longer. Lower bound of a stage s with times (F_s, BW_s): microbatch 0 reaches it
    after the earlier stages' F, it then works m (F_s + BW_s), and the last gradient still has to cross the
    earlier stages' BW; the stages not placed yet hold the rest of the layers, so one of them works at least
    m x (their least F + BW) / (stages left), after the placed stages' F."""
    n, p, m = len(stages.costs), len(stages.in_flight), incumbent.n_microbatches
    least_rest = [0.0] * (n + 1)  # least F + BW of layers [j, n): no recomputation
    for j in range(n - 1, -1, -1):
        least_rest[j] = least_rest[j + 1] + stages.costs[j].forward + stages.costs[j].backward
    best = [incumbent]

    def walk(s: int, i: int, cuts: tuple[int, ...], before_f: float, before_bw: float, bound: float):
        for j in range(i + 1, n - p + s + 2):
            if (s, i, j) not in cell:
                continue
            f, bw = stages.times(i, j, cell[s, i, j][1])
            lower = max(bound, before_f + m * (f + bw) + before_bw)
            if s < p - 1:
                lower = max(lower, before_f + f + m * least_rest[j] / (p - 1 - s))
            if lower >= best[0].step_time:
                continue
            if s < p - 1:
                walk(s + 1, j, cuts + (j,), before_f + f, before_bw + bw, lower)
            elif j == n:
                found = _evaluated(stages, plan, cuts + (j,), _policies(cell, cuts + (j,)), incumbent.schedule, m)
                if found.step_time < best[0].step_time:
                    best[0] = found

    walk(0, 0, (0,), 0.0, 0.0, 0.0)
    return best[0]


def _min_sum(by_stage: list, n: int, p: int, bottleneck: float):
    """(least sum, boundaries) over cuts whose every stage time is at most ``bottleneck``, or None."""
    best = [{0: (0.0, None)}]  # best[s][j] = (least sum of stages < s ending at layer j, previous cut)
    for s in range(p):
        row = {}
        for i, j, t in by_stage[s]:
            if t <= bottleneck and i in best[s]:
                total = best[s][i][0] + t
                if j not in row or total < row[j][0]:
                    row[j] = (total, i)
        best.append(row)
    if n not in best[p]:
        return None
    cuts, j = [n], n
    for s in range(p, 0, -1):
        j = best[s][j][1]
        cuts.append(j)
    return best[p][n][0], tuple(reversed(cuts))


def _least_peak_memory(stages: _Stages, n: int, p: int) -> int:
    """The least max-over-stages peak memory any cuts and policies reach (what the cap must allow)."""
    least = [{0: 0}]
    for s in range(p):
        row = {}
        for i, before in least[s].items():
            for j in range(i + 1, n - p + s + 2):
                peak = max(before, min(stages.memory(s, i, j, pol) for pol in stages.policies))
                row[j] = min(row.get(j, math.inf), peak)
        least.append(row)
    return least[p][n]

"""Load balance of expert parallelism as numbers: tokens per ep rank under a placement, a balanced placement
(FlexMoE / SmartMoE: re-place hot experts so the ranks' loads even out, moving few experts),
the cost model that says whether moving pays, and the bytes of moving experts against moving tokens (Janus).

Pure functions of plain tensors and ints: no communication, the same answer on every rank (every input is
global: the load is summed over the global batch by the router, the placement is a replicated buffer).

A placement is ``slot_E``: expert e's weights are row ``slot_E[e]`` of the (E, ...) expert weights, so it lives
on ep rank ``slot_E[e] // L`` (L = E / ep experts per rank); see ``MoE.expert_slot``.

Legend: E experts, L experts per ep rank, ep ranks n, D width, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["rank_load", "imbalance", "balanced_slots", "moved_experts", "PlacementCost",
           "token_moving_bytes", "expert_moving_bytes", "experts_to_shadow"]


def rank_load(load_E: torch.Tensor, slot_E: torch.Tensor, ep: int) -> torch.Tensor:
    """(ep,) assignments each ep rank's experts process under placement ``slot_E``."""
    E = load_E.numel()
    _check(slot_E, E, ep)
    return torch.zeros(ep, dtype=torch.float64).index_add_(0, slot_E.cpu() // (E // ep), load_E.cpu().double())


def imbalance(load_E: torch.Tensor, slot_E: torch.Tensor, ep: int) -> float:
    """max / mean of the ranks' loads: 1.0 is perfect balance; the step waits for the busiest rank."""
    per_rank = rank_load(load_E, slot_E, ep)
    mean = per_rank.mean().item()
    return per_rank.max().item() / mean if mean else 1.0


def balanced_slots(load_E: torch.Tensor, slot_E: torch.Tensor, ep: int) -> torch.Tensor:
    """A placement whose busiest rank is as light as two greedy rules find, moving few experts.

    Two candidates, the lighter busiest rank wins (ties: fewer experts moved; then the old placement, so an
    even load moves nothing):

    * swaps (SmartMoE's local search): from the current placement, swap an expert of the busiest rank with one
      of another rank while that lowers the larger of the two ranks' loads below the busiest's (the best such
      swap each time); two experts move per swap;
    * longest-processing-time first: experts by load, heaviest first, each to the least loaded rank with a
      free slot; the groups are matched to ranks keeping the most experts where they are.

    Either way an expert that stays on its rank keeps its row: only experts that change rank move.
    """
    E = load_E.numel()
    _check(slot_E, E, ep)
    old = slot_E.cpu().clone()
    loads = [float(v) for v in load_E.cpu().tolist()]
    candidates = [old] + [_rows_kept(old, found, ep) for found in (_by_swaps(loads, old, ep),
                                                                   _by_longest_first(loads, old, ep))]
    return min(candidates, key=lambda s: (rank_load(load_E, s, ep).max().item(), moved_experts(old, s, ep)))


def _rows_kept(old_slot_E: torch.Tensor, new_slot_E: torch.Tensor, ep: int) -> torch.Tensor:
    """``new_slot_E``'s ranks, but an expert on the rank it was on keeps its old row (it need not travel); the
    newcomers of a rank take its free rows in expert order."""
    L = old_slot_E.numel() // ep
    old, new = old_slot_E.tolist(), new_slot_E.tolist()
    slots = [o if o // L == n // L else -1 for o, n in zip(old, new)]
    for r in range(ep):
        free = iter(sorted(set(range(r * L, (r + 1) * L)) - set(slots)))
        for e in (e for e in range(len(new)) if slots[e] < 0 and new[e] // L == r):
            slots[e] = next(free)
    return torch.tensor(slots, dtype=old_slot_E.dtype)


def _by_swaps(loads: list[float], slot_E: torch.Tensor, ep: int) -> torch.Tensor:
    L = len(loads) // ep
    slots = slot_E.tolist()
    for _ in range(len(loads) ** 2):  # each swap lowers a busiest rank strictly; a bound against float ties
        on_rank = [[e for e in range(len(loads)) if slots[e] // L == r] for r in range(ep)]
        totals = [sum(loads[e] for e in experts) for experts in on_rank]
        busiest = max(range(ep), key=lambda r: (totals[r], -r))
        best, best_peak = None, totals[busiest]
        for e in on_rank[busiest]:
            for r in (r for r in range(ep) if r != busiest):
                for f in on_rank[r]:
                    moved = loads[e] - loads[f]
                    peak = max(totals[busiest] - moved, totals[r] + moved)
                    if peak < best_peak:
                        best, best_peak = (e, f), peak
        if best is None:
            break
        e, f = best
        slots[e], slots[f] = slots[f], slots[e]
    return torch.tensor(slots, dtype=slot_E.dtype)


def _by_longest_first(loads: list[float], slot_E: torch.Tensor, ep: int) -> torch.Tensor:
    E = len(loads)
    L = E // ep
    groups: list[list[int]] = [[] for _ in range(ep)]
    totals = [0.0] * ep
    for e in sorted(range(E), key=lambda e: (-loads[e], e)):
        r = min((r for r in range(ep) if len(groups[r]) < L), key=lambda r: (totals[r], r))
        groups[r].append(e)
        totals[r] += loads[e]
    old_rank = [int(s) // L for s in slot_E.tolist()]
    overlap = {(g, r): sum(old_rank[e] == r for e in groups[g]) for g in range(ep) for r in range(ep)}
    rank_of_group: dict[int, int] = {}
    for g, r in sorted(overlap, key=lambda gr: (-overlap[gr], gr)):
        if g not in rank_of_group and r not in rank_of_group.values():
            rank_of_group[g] = r
    new_slot = [0] * E
    for g, r in rank_of_group.items():
        for i, e in enumerate(groups[g]):
            new_slot[e] = r * L + i
    return torch.tensor(new_slot, dtype=slot_E.dtype)


def moved_experts(old_slot_E: torch.Tensor, new_slot_E: torch.Tensor, ep: int) -> int:
    """How many experts change ep rank between two placements (those that send bytes)."""
    L = old_slot_E.numel() // ep
    return int((old_slot_E.cpu() // L != new_slot_E.cpu() // L).sum())


@dataclass(frozen=True)
class PlacementCost:
    """When re-placing experts pays: the busiest rank's saved compute over ``horizon_steps`` steps against the
    time to move the experts that change rank (each sent once, ep links in parallel: the busiest sender counts
    approximately as the total over ranks, an upper bound).

    seconds_per_assignment: expert compute for one (token, expert) row, forward and backward (on a GPU about
        6 D F flops / peak; measure it). expert_bytes: one expert's weights plus what moves with them
        (gradients if any, the optimizer's state: AdamW fp32, 3x the fp32 weights). bytes_per_second: the ep
        link. horizon_steps: steps the new placement is expected to serve (until the next re-plan).
    """

    seconds_per_assignment: float
    expert_bytes: float
    bytes_per_second: float
    horizon_steps: int

    def saving_seconds(self, load_E: torch.Tensor, old_slot_E: torch.Tensor, new_slot_E: torch.Tensor,
                       ep: int) -> float:
        before = rank_load(load_E, old_slot_E, ep).max().item()
        after = rank_load(load_E, new_slot_E, ep).max().item()
        return (before - after) * self.seconds_per_assignment * self.horizon_steps

    def moving_seconds(self, old_slot_E: torch.Tensor, new_slot_E: torch.Tensor, ep: int) -> float:
        return moved_experts(old_slot_E, new_slot_E, ep) * self.expert_bytes / self.bytes_per_second

    def pays(self, load_E, old_slot_E, new_slot_E, ep: int) -> bool:
        return self.saving_seconds(load_E, old_slot_E, new_slot_E, ep) > self.moving_seconds(old_slot_E, new_slot_E, ep)


def token_moving_bytes(tokens_per_rank: int, top_k: int, dim: int, ep: int, element_bytes: int = 4) -> float:
    """Bytes one rank sends to move tokens for one layer's forward and backward, routing spread evenly: dispatch
    and combine each send ``tokens k (ep-1)/ep`` rows of D, and backward sends them again."""
    return 4 * tokens_per_rank * top_k * dim * element_bytes * (ep - 1) / ep


def expert_moving_bytes(experts_per_rank: int, expert_params: int, ep: int, element_bytes: int = 4) -> float:
    """Bytes one rank sends to move experts instead (Janus, data-centric): every other rank fetches its L experts'
    weights for the forward and sends their gradients back (a reduce), ``2 (ep-1) L P`` elements."""
    return 2 * (ep - 1) * experts_per_rank * expert_params * element_bytes


def experts_to_shadow(load_E: torch.Tensor, dim: int, expert_params: int, ep: int) -> tuple[int, ...]:
    """The experts worth shadowing (FasterMoE; Janus's data-centric choice per expert): those whose assignments
    of one step (``load_E``, global) would move more bytes as tokens, ``4 load_e (ep-1)/ep D`` (the share from
    other ranks, dispatch and combine, forward and backward), than the expert moves, ``2 (ep-1) P`` (its weights
    broadcast, its gradient reduced). Most popular first."""
    if ep == 1:
        return ()
    loads = [float(v) for v in load_E.cpu().tolist()]
    worth = [e for e, v in enumerate(loads) if 4 * v * (ep - 1) / ep * dim > 2 * (ep - 1) * expert_params]
    return tuple(sorted(worth, key=lambda e: (-loads[e], e)))


def _check(slot_E: torch.Tensor, E: int, ep: int) -> None:
    if E % ep:
        raise ValueError(f"{E} experts do not divide over {ep} ep ranks; use a number of experts that is a multiple")
    if slot_E.numel() != E or sorted(slot_E.cpu().tolist()) != list(range(E)):
        raise ValueError(f"a placement must give each of the {E} experts its own row 0..{E - 1}; got {slot_E.tolist()}")

"""Why each family of layouts lost: a family is every layout sharing one choice ("no pipeline", "pp 64",
"tp 16 across nodes", "zero-0", "recompute full", ...). Its verdict compares its best member with the winner.

- No member fits: **memory**, by how much its most frugal priced member is over (or the analytic lower bound
  of the model state, for shapes ruled out before pricing), **divisibility** when no member can divide, or
  **refused** when the workload's own code refuses every member (e.g. sp with cp in examples/gpt.py).
- A member fits but is slower: the part of the step that grew most against the winner's, one of
  **communication** (exposed collectives, naming the mesh dim and whether it crosses nodes), **bubble**
  (pipeline idle time), **compute** (recomputation, or shards too thin to run efficiently) or **other** (what
  the step time holds beyond those, e.g. offload transfers); **tie** when it is as fast.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .layout import ParallelLayout

__all__ = ["FamilyVerdict", "shape_families", "option_families", "families_of", "judge_families"]

GIB = 1 << 30


@dataclass(frozen=True)
class FamilyVerdict:
    """One losing family: ``kind`` (memory, communication, bubble, compute, divisibility), the sentence
    ``reason``, and ``best``: its best priced Estimate (the one that fits, else the most frugal), if any."""

    family: str
    kind: str
    reason: str
    best: object = None


def shape_families(layout: ParallelLayout, gpus_per_node: int) -> list[str]:
    """The families of the layout's sizes."""
    out = ["no pipeline" if layout.pp == 1 else f"pp {layout.pp}"]
    out.append("no tp" if layout.tp == 1 else f"tp {layout.tp}" + (" across nodes" if layout.tp > gpus_per_node else ""))
    out.append("no cp" if layout.cp == 1 else f"cp {layout.cp}")
    out += [f"ep {layout.ep}"] if layout.ep > 1 else []
    return out


def option_families(layout: ParallelLayout) -> list[str]:
    """The families of the layout's per-step options."""
    out = [f"zero-{layout.zero}", "no recompute" if layout.recompute == "none" else f"recompute {layout.recompute}"]
    out.append("offload" if layout.offload else "no offload")
    if layout.tp > 1:
        out.append("sp" if layout.sequence_parallel else "no sp")
    if layout.pp > 1:
        out.append(layout.schedule + (f" v{layout.virtual_stages}" if layout.virtual_stages > 1 else ""))
    return out


def families_of(layout: ParallelLayout, gpus_per_node: int) -> list[str]:
    return shape_families(layout, gpus_per_node) + option_families(layout)


def size_text(n: float) -> str:
    """Bytes as GiB, or MiB below one GiB (small models' plans)."""
    return f"{n / GIB:.1f} GiB" if abs(n) >= GIB else f"{n / (1 << 20):.1f} MiB"


def _memory_total(estimate) -> int:
    return sum(estimate.memory.values())


def _compare(best, winner, gpus_per_node: int) -> tuple[str, str]:
    """(kind, sentence): which part of the step grew most from the winner's to this family's best."""
    slower = best.step_time / winner.step_time - 1
    head = f"{slower:+.0%} step time ({best.step_time:.3g} s vs {winner.step_time:.3g} s) at its best, {best.layout}"
    parts = {("compute", None): best.compute_s - winner.compute_s, ("bubble", None): best.bubble_s - winner.bubble_s}
    for dim in set(best.exposed_communication_s) | set(winner.exposed_communication_s):
        parts[("communication", dim)] = (best.exposed_communication_s.get(dim, 0.0)
                                         - winner.exposed_communication_s.get(dim, 0.0))
    def rest(e) -> float:  # per-step work the cost model adds outside these parts (e.g. offload transfers)
        return e.step_time - e.compute_s - e.bubble_s - sum(e.exposed_communication_s.values())

    parts[("other", None)] = rest(best) - rest(winner)
    (kind, dim), grew = max(parts.items(), key=lambda item: item[1])
    if slower <= 1e-9 or grew <= 0:
        return "tie", f"ties the winner: {head}"
    if kind == "other":
        what = "offload transfers, " if best.layout.offload else ""
        return kind, (f"per-step work outside compute, exposed communication and bubble ({what}as the cost model "
                      f"adds it): {rest(best):.3g} s vs {rest(winner):.3g} s; {head}")
    if kind == "communication":
        crosses = dim in best.layout.order and not best.layout.intra_node(gpus_per_node).get(dim, True)
        where = f" ({dim} crosses nodes)" if crosses else ""
        return kind, (f"communication: {best.exposed_communication_s.get(dim, 0.0):.3g} s of exposed {dim} "
                      f"collectives{where} vs {winner.exposed_communication_s.get(dim, 0.0):.3g} s; {head}")
    if kind == "bubble":
        return kind, f"bubble: {best.bubble_s:.3g} s pipeline idle vs {winner.bubble_s:.3g} s; {head}"
    why = " (recomputation)" if best.layout.recompute != "none" else ""
    return kind, f"compute: {best.compute_s:.3g} s vs {winner.compute_s:.3g} s{why}; {head}"


def judge_families(winner, estimates: Sequence, ruled_out: Iterable[tuple[ParallelLayout, str, float | None]],
                   cluster, memory: int, savings: Iterable[str] = ()) -> list[FamilyVerdict]:
    """A verdict for every family the winner is not in (all families when nothing fits), sorted by name within
    kind (memory first). ``ruled_out``: (layout, why, memory lower bound in bytes or None) of unpriced shapes.
    ``savings``: the memory-saving families the search could have used (e.g. "zero-3", "recompute full",
    "offload"); one never priced is **unneeded**: the search prices a saving only where it is needed to fit."""
    gpn = cluster.gpus_per_node
    own = set(families_of(winner.layout, gpn)) if winner is not None else set()
    members: dict[str, list] = {}
    for est in estimates:
        for family in families_of(est.layout, gpn):
            members.setdefault(family, []).append(est)
    unpriced: dict[str, list[tuple[ParallelLayout, str, float | None]]] = {}
    for entry in ruled_out:
        for family in families_of(entry[0], gpn):
            unpriced.setdefault(family, []).append(entry)

    verdicts = []
    for family in sorted(set(members) | set(unpriced)):
        if family in own:
            continue
        priced = members.get(family, [])
        fits = [e for e in priced if e.fits]
        if fits and winner is not None:
            best = min(fits, key=lambda e: e.step_time)
            kind, reason = _compare(best, winner, gpn)
            verdicts.append(FamilyVerdict(family, kind, reason, best))
        elif fits:  # cannot happen: a fitting estimate would be the winner
            raise AssertionError("a family fits but there is no winner")
        elif priced:
            best = min(priced, key=_memory_total)
            need = _memory_total(best)
            verdicts.append(FamilyVerdict(family, "memory", (
                f"memory: {size_text(need)} per device at its most frugal, {best.layout}, is "
                f"{size_text(need - memory)} over the {size_text(memory)}"), best))
        else:
            reasons = unpriced[family]
            bounded = [(need, layout, why) for layout, why, need in reasons if need is not None]
            if bounded:
                need, layout, why = min(bounded, key=lambda item: item[0])
                verdicts.append(FamilyVerdict(family, "memory", (
                    f"memory: model state alone needs at least {size_text(need)} per device even as {layout}, "
                    f"{size_text(need - memory)} over the {size_text(memory)} (not priced)")))
            else:
                layout, why, _ = reasons[0]
                if why.startswith("the workload refuses") or why.startswith("not runnable"):
                    verdicts.append(FamilyVerdict(family, "refused", f"cannot run: {why} ({layout})"))
                else:
                    verdicts.append(FamilyVerdict(family, "divisibility", f"cannot divide: {why} ({layout})"))
    judged = {v.family for v in verdicts}
    for family in savings:
        if family not in own and family not in judged and winner is not None:
            verdicts.append(FamilyVerdict(family, "unneeded", (
                "unneeded: a memory saving the winner fits without, and savings only add time (collectives, "
                "recomputation, host transfers), so it was not priced")))
    order = {"memory": 0, "divisibility": 1, "refused": 1, "communication": 2, "bubble": 3, "compute": 4, "other": 5,
             "tie": 6, "unneeded": 7}
    return sorted(verdicts, key=lambda v: (order[v.kind], v.family))

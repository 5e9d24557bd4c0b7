"""The planner: enumerate layouts, rule out what cannot divide or cannot fit, price the rest, rank them.

    from dtensor_plus.plan import search, gpt_workload, CLUSTERS
    result = search(gpt_workload("gpt3-175b"), 1024, CLUSTERS["a100"], global_batch=1536)
    print(result.table())                      # ranked plans and why each losing family lost
    result.winner.layout.mesh_shape()          # what init_device_mesh takes
    result.train_gpt_flags()                   # examples/train_gpt.py's command line for it

How it stays fast (seconds for GPT-3 175B on 1024 GPUs) while pricing every shape:

1. Shapes: every (dp, tp, pp, cp, ep) whose product is the world, and each mesh order that changes which dims
   stay inside a node (space.py). Divisibility (heads by tp, layers by pp, batch by dp, sequence by cp) rules
   shapes out with a sentence, before anything is priced.
2. Memory lower bound: the model state a shape needs at least, with every saving it may use (ZeRO-3, offload),
   from parameter counts and the bytes per parameter ``estimate`` reports for one rank (space.StateBound).
   Over the memory per device: ruled out, by how much.
3. First pricing: each remaining shape once at its cheapest options (1F1B, microbatch 1, sp on, no
   recomputation, ZeRO-0), then down a ladder of memory savings (ZeRO-1, 2, selective recomputation, ZeRO-3,
   full recomputation, offload) only until it fits; steps whose state bound is over the memory are not priced.
4. Refinement: the best ``space.refine`` shapes get every option tried one axis at a time (sp, microbatch size
   by halves and doubles, schedule and virtual stages; ZeRO, recomputation and offload together, as one trade),
   keeping what is faster and fits, until nothing improves; the best shape of every other family (so each
   family's verdict compares its own best) gets the moves that need no new simulated profile (all but sp and
   microbatch size). The simulated profiles (one per tp, sp, cp, microbatch size) are what costs time.
5. The winner with each per-step option it did not take (each ZeRO stage, recomputation, offload, schedule),
   so those families' verdicts compare against the winner itself.

Every estimate is cached by layout, so nothing is priced twice; ``estimate`` itself caches its profiles.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .families import FamilyVerdict, judge_families, size_text
from .layout import LOOPED, ParallelLayout
from .space import SearchSpace, Shape, StateBound, shapes

__all__ = ["search", "SearchResult", "SearchSpace"]

@dataclass(frozen=True)
class SearchResult:
    """Ranked plans (``plans``: Estimates that fit, fastest first) and why the rest lost.

    ``losers``: family name -> one sentence (memory by how much, communication on which mesh dim, bubble,
    compute); ``families``: the same with the family's best layout. ``ruled_out``: shapes not priced at all (as
    their most frugal layout) and why (divisibility, memory lower bound). ``priced``: how many layouts ``estimate`` priced."""

    workload: object
    world: int
    cluster: object
    global_batch: int
    memory_per_device: int
    plans: tuple
    losers: Mapping[str, str]
    families: tuple[FamilyVerdict, ...]
    ruled_out: Mapping[ParallelLayout, str]
    priced: int
    seconds: float
    notes: tuple[str, ...] = ()
    all_estimates: tuple = field(default=(), repr=False)

    @property
    def winner(self):
        if not self.plans:
            raise ValueError(f"no layout of {self.workload.name} fits {_gib(self.memory_per_device)} per "
                             f"device on {self.world} ranks; see .losers for how far each family is over")
        return self.plans[0]

    def mesh_shape(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        return self.winner.layout.mesh_shape()

    def train_gpt_flags(self) -> list[str]:
        return self.winner.layout.to_train_gpt_flags(self.global_batch)

    def tp_plan(self) -> dict:
        """The winner's tensor-parallel plan (module pattern -> style, what ``parallelize_module`` takes): the
        workload's ``tp_plan(sequence_parallel)`` if it has one, else the ``tp_plan(config, sequence_parallel)``
        of the module defining its model class (examples/gpt.py's, for gpt_workload), the model built with one
        layer on the meta device. {} when the winner has no tp."""
        layout = self.winner.layout
        if layout.tp == 1:
            return {}
        make = getattr(self.workload, "tp_plan", None)
        if make is not None:
            return make(layout.sequence_parallel)
        import sys

        from .space import build_on_meta

        model = build_on_meta(self.workload, 1)
        module_plan = getattr(sys.modules.get(type(model).__module__), "tp_plan", None)
        if module_plan is None or not hasattr(model, "config"):
            raise ValueError(f"workload {self.workload.name!r} has no tp_plan, nor does its model's module: its own "
                             f"place() lays tp out; give it a tp_plan(sequence_parallel) to see the plan here")
        return module_plan(model.config, sequence_parallel=layout.sequence_parallel)

    def table(self, top: int | None = None) -> str:
        from .table import format_table

        return format_table(self, top)


_gib = size_text


class _Pricer:
    """``estimate`` with a cache by layout and the run's fixed arguments. A layout the workload cannot run
    (its ``place`` refuses it with a ValueError or NotImplementedError, e.g. a model whose sp and cp do not
    compose) prices as None, its error kept in ``refused`` as the reason."""

    def __init__(self, estimator, workload, cluster, global_batch, memory):
        self.estimator, self.workload, self.cluster = estimator, workload, cluster
        self.global_batch, self.memory = global_batch, memory
        self.cache: dict[ParallelLayout, object] = {}
        self.refused: dict[ParallelLayout, str] = {}
        self.refused_placements: dict[tuple, str] = {}

    def __call__(self, layout: ParallelLayout):
        if layout in self.refused:
            return None
        # A refusal comes from placing the model, which sees the per-rank fields (what the profile simulates):
        # another layout sharing them is refused without simulating again (a refused simulation is not cached).
        placed = (layout.tp, layout.sequence_parallel, layout.cp, layout.micro_batch_size, layout.zero, layout.dp > 1)
        if placed in self.refused_placements:
            self.refused[layout] = self.refused_placements[placed]
            return None
        if layout not in self.cache:
            try:
                self.cache[layout] = self.estimator(self.workload, layout, self.cluster, self.global_batch, self.memory)
            except (ValueError, NotImplementedError) as err:
                self.refused[layout] = self.refused_placements[placed] = f"the workload refuses it: {err}"
                return None
        return self.cache[layout]


def _facts(workload, world: int, global_batch: int) -> dict:
    return dict(world=world, num_layers=workload.num_layers, num_heads=workload.num_heads,
                seq_len=workload.seq_len, global_batch=global_batch, experts=getattr(workload, "experts", 0) or 0)


def _valid(layout: ParallelLayout, facts: dict, space: SearchSpace) -> bool:
    return not layout.problems(**facts) and space.allows(layout)


def _with(layout: ParallelLayout, **changes) -> ParallelLayout | None:
    try:
        return layout.replace(**changes)
    except ValueError:  # e.g. zero on dp 1, sp on tp 1
        return None


def _first_options(shape: Shape, space: SearchSpace, global_batch: int) -> list[ParallelLayout]:
    """The shape's cheapest options, then one memory saving more at each step (the ladder of step 3); the search
    skips (unpriced) the steps whose state bound is over the memory."""
    # sp on by default (same bytes as tp's all-reduces, norms' activations / tp), but not with cp: both shard
    # the sequence, and models (examples/gpt.py) let cp cover the norms instead
    sp = shape.tp > 1 and shape.cp == 1 and True in space.sequence_parallel or False not in space.sequence_parallel
    mbs = global_batch // shape.dp if space.whole_batch_without_pp and shape.pp == 1 else min(space.micro_batch_sizes)
    schedule = space.schedules[0] if shape.pp > 1 else "1f1b"
    zeros = [z for z in sorted(space.zero) if z == 0 or shape.dp > 1]
    start = shape.base(sequence_parallel=sp, micro_batch_size=max(mbs, 1), schedule=schedule,
                       zero=zeros[0], recompute="none" if "none" in space.recompute else space.recompute[0])
    ladder, current = [start], start
    steps = [dict(zero=z) for z in zeros if z > start.zero and z < 3]
    steps += [dict(recompute="selective")] if "selective" in space.recompute else []
    steps += [dict(zero=3)] if 3 in zeros and start.zero < 3 else []
    steps += [dict(recompute="full")] if "full" in space.recompute else []
    steps += [dict(offload=True)] if True in space.offload else []
    # within each rung, the V schedules that hold less (V-Half ~1/2, V-Min ~1/3 of 1F1B's activations), which
    # cost only bubble: a shape that fits with one of them is priced before it is given more savings
    frugal = [s for s in ("v_half", "v_min") if s in space.schedules and s != schedule] if shape.pp > 1 else []
    for change in [{}] + steps:
        nxt = _with(current, **change)
        if nxt is None:
            continue
        current = nxt
        ladder += ([nxt] if change else []) + [n for n in (_with(nxt, schedule=s) for s in frugal) if n is not None]
    return ladder


_RECOMPUTE_LEVEL = MappingProxyType({"none": 0, "selective": 1, "full": 2})


def _saves_no_less(a: ParallelLayout, b: ParallelLayout) -> bool:
    """Does ``a`` use every memory saving ``b`` uses, at least as much (ZeRO stage, recomputation, offload)?"""
    return (a.zero >= b.zero and _RECOMPUTE_LEVEL[a.recompute] >= _RECOMPUTE_LEVEL[b.recompute]
            and a.offload >= b.offload)


def _neighbours(layout: ParallelLayout, space: SearchSpace, global_batch: int, same_profile: bool = False
                ) -> list[ParallelLayout]:
    """The layouts one option away (step 4's axes). The memory savings (ZeRO stage, recomputation, offload)
    move together: trading one for another (ZeRO-3 instead of recomputation) is often the better plan, and
    neither half of the trade alone fits or is faster; a move that gives up no saving is left out (savings cost
    time: more collectives, more compute or host transfers). Microbatch size moves by halves and doubles.
    ``same_profile``: only moves that keep tp, sp, cp and the microbatch size (no new simulated profile)."""
    out = [_with(layout, zero=z, recompute=r, offload=o)
           for z in space.zero for r in space.recompute for o in space.offload]
    out = [n for n in out if n is not None and not _saves_no_less(n, layout)]
    if not same_profile:
        out += [_with(layout, sequence_parallel=sp) for sp in space.sequence_parallel]
    if not same_profile and not (space.whole_batch_without_pp and layout.pp == 1):
        sizes = sorted(space.micro_batch_sizes)
        here = sizes.index(layout.micro_batch_size) if layout.micro_batch_size in sizes else None
        out += [_with(layout, micro_batch_size=sizes[i]) for i in ((here - 1, here + 1) if here is not None else ())
                if 0 <= i < len(sizes)]
    if layout.pp > 1:
        for schedule in space.schedules:
            vs = space.virtual_stages if schedule in LOOPED else (1,)
            out += [_with(layout, schedule=schedule, virtual_stages=v) for v in vs]
    return [n for n in out if n is not None and n != layout]


def _option_variants(layout: ParallelLayout, space: SearchSpace) -> list[ParallelLayout]:
    """The layout with one per-step option changed (ZeRO stage, recomputation, offload, schedule), each value."""
    out = [_with(layout, zero=z) for z in space.zero] + [_with(layout, recompute=r) for r in space.recompute]
    out += [_with(layout, offload=o) for o in space.offload]
    if layout.pp > 1:
        for schedule in space.schedules:
            out += [_with(layout, schedule=schedule, virtual_stages=v)
                    for v in (space.virtual_stages if schedule in LOOPED else (1,))]
    return [n for n in out if n is not None and n != layout]


def search(workload, world: int, cluster, global_batch: int, memory_per_device: int | None = None, top: int = 10,
           *, space: SearchSpace | None = None, estimator: Callable | None = None) -> SearchResult:
    """Rank the layouts of ``workload`` on ``world`` ranks of ``cluster`` for ``global_batch`` sequences a step.

    ``memory_per_device`` (bytes) defaults to the cluster's. ``space`` narrows the choices (SearchSpace;
    ``SearchSpace.train_gpt(global_batch)``: what examples/train_gpt.py runs). ``estimator``: the cost model,
    ``dtensor_plus.plan.cost.estimate`` by default (same signature). Returns a SearchResult with the ``top``
    fastest layouts that fit, each family's verdict, and what was ruled out before pricing."""
    started = time.perf_counter()
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int (ranks), got {world!r}")
    if not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"global_batch must be a positive int (sequences per step), got {global_batch!r}")
    if estimator is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            raise RuntimeError(
                "search() simulates the model in a world of its own, which cannot start in a process already in a "
                "process group: plan before init_process_group, or in a fresh process (python -m dtensor_plus.plan "
                "... --flags-out winner.json, as examples/train_gpt.py --auto does)")
        from .cost import estimate as estimator
    space = space or SearchSpace()
    memory = int(memory_per_device if memory_per_device is not None else cluster.memory_bytes)
    price = _Pricer(estimator, workload, cluster, global_batch, memory)
    facts = _facts(workload, world, global_batch)
    notes = []

    try:  # bytes per parameter of each state kind, as the cost model counts them on one rank
        bound = StateBound.calibrate(workload, estimator(workload, ParallelLayout(), cluster, 1, memory))
    except Exception as err:  # noqa: BLE001 - the bound is an optimization; say so and search without it
        bound = None
        notes.append(f"no memory lower bound ({type(err).__name__}: {err}): every shape priced")

    ruled_out: list[tuple[ParallelLayout, str, float | None]] = []
    first: dict[Shape, object] = {}  # shape -> its first fitting estimate, or its most frugal one that did not fit
    fitting: dict[Shape, bool] = {}
    for shape in shapes(world, cluster.gpus_per_node, space, seq_len=workload.seq_len, experts=facts["experts"]):
        ladder = _first_options(shape, space, global_batch)
        frugal = next(lay for lay in reversed(ladder) if lay.schedule == ladder[0].schedule)  # most savings
        why = frugal.problems(**facts)
        if why:
            ruled_out.append((frugal, "; ".join(why), None))
            continue
        if bound is not None and bound.bytes(frugal) > memory:
            ruled_out.append((frugal, f"memory: model state alone needs at least {_gib(bound.bytes(frugal))} per "
                                      f"device > {_gib(memory)}", bound.bytes(frugal)))
            continue
        for layout in ladder:
            if not _valid(layout, facts, space):
                continue
            if bound is not None and bound.bytes(layout) > memory:
                ruled_out.append((layout, f"memory: model state alone needs at least {_gib(bound.bytes(layout))} "
                                          f"per device > {_gib(memory)}", bound.bytes(layout)))
                continue
            est = price(layout)
            if est is None:
                continue
            first[shape], fitting[shape] = est, est.fits
            if est.fits:
                break
        else:
            if shape not in first:
                refusal = next((price.refused[lay] for lay in ladder if lay in price.refused), None)
                ruled_out.append((frugal, refusal or "not runnable in this search space", None))

    # Refinement: the best shapes, plus each family's best (judge_families compares families by their best).
    ranked = sorted((s for s in first if fitting[s]), key=lambda s: first[s].step_time)
    top_shapes = ranked[: space.refine]
    chosen = list(dict.fromkeys(top_shapes + _family_representatives(ranked, first, cluster)))
    for shape in chosen:
        best = first[shape]
        for _ in range(4):
            improved = False
            for layout in _neighbours(best.layout, space, global_batch, same_profile=shape not in top_shapes):
                if not _valid(layout, facts, space):
                    continue
                if bound is not None and bound.bytes(layout) > memory:
                    continue
                est = price(layout)
                if est is not None and est.fits and est.step_time < best.step_time:
                    best, improved = est, True
            if not improved:
                break

    # Each per-step option the winner did not take, on the winner itself: the cleanest "why not zero-3" (same
    # profile, so no new simulation).
    provisional = min((e for e in price.cache.values() if e.fits), key=lambda e: e.step_time, default=None)
    if provisional is not None:
        for layout in _option_variants(provisional.layout, space):
            if _valid(layout, facts, space) and (bound is None or bound.bytes(layout) <= memory):
                price(layout)

    estimates = tuple(price.cache.values())
    # Ties (equal predicted time) go to the layout with less memory: the same speed with more headroom.
    plans = sorted((e for e in estimates if e.fits), key=lambda e: (e.step_time, sum(e.memory.values()), str(e.layout)))
    savings = [f"zero-{z}" for z in space.zero if z] + [f"recompute {r}" for r in space.recompute if r != "none"]
    savings += ["offload"] if True in space.offload else []
    verdicts = judge_families(plans[0] if plans else None, estimates, ruled_out, cluster, memory, savings)
    return SearchResult(
        workload=workload, world=world, cluster=cluster, global_batch=global_batch, memory_per_device=memory,
        plans=tuple(plans[:top]), losers=MappingProxyType({v.family: v.reason for v in verdicts}),
        families=tuple(verdicts), ruled_out=MappingProxyType({layout: why for layout, why, _ in ruled_out}), priced=len(price.cache),
        seconds=time.perf_counter() - started, notes=tuple(notes), all_estimates=estimates)


def _family_representatives(ranked: list[Shape], first: Mapping, cluster) -> list[Shape]:
    """The best-priced shape of each family (tp, pp, cp, dp value), so every family's verdict is refined."""
    from .families import shape_families

    seen, out = set(), []
    for shape in ranked:
        for family in shape_families(first[shape].layout, cluster.gpus_per_node):
            if family not in seen:
                seen.add(family)
                out.append(shape)
    return out

"""The layout space the planner searches, and the cheap tests that rule parts of it out before pricing.

``SearchSpace`` says which choices are open (ZeRO stages, microbatch sizes, schedules, recomputation, offload,
whether tp may cross nodes, how far cp goes); ``shapes(...)`` enumerates the sizes (dp, tp, pp, cp, ep) whose
product is the world and the mesh orders that change which dims stay inside a node; ``problems`` of the layout
rules out what cannot divide. ``StateBound`` is the analytic memory lower bound: parameter counts (the model
built on the meta device with one and two layers) times the bytes per parameter of each kind that ``estimate``
itself reports for one rank, divided by the sharding the layout guarantees at least (tp, pp, ep; dp for the
kinds ZeRO shards). Activations count 0 in it, so a layout over it cannot fit, whatever ``estimate`` says.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from .layout import RECOMPUTE, SCHEDULES, ParallelLayout

__all__ = ["SearchSpace", "Shape", "shapes", "StateBound", "parameter_counts", "build_on_meta"]

TRAIN_GPT_ORDER = ("pp", "dp", "tp", "cp")


@dataclass(frozen=True)
class SearchSpace:
    """The open choices. ``tp_across_nodes``: also price tp wider than a node (it is a family the table explains,
    usually losing on communication). ``runnable``: a filter every priced layout must pass (e.g. "train_gpt can
    run it"). ``whole_batch_without_pp``: without a pipeline the step runs each rank's batch at once
    (micro_batch_size = global_batch / dp), as train_gpt does. ``refine``: how many of the best shapes get every
    option tried after the first pricing (the rest keep their first, cheapest fitting options)."""

    zero: tuple[int, ...] = (0, 1, 2, 3)
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    # every schedule the executor runs; the first is where a shape's option ladder starts
    schedules: tuple[str, ...] = ("1f1b", "interleaved_1f1b", "zb_h1", "gpipe", "zb_v", "dualpipe_v", "v_half",
                                  "v_min", "breadth_first", "chimera")
    virtual_stages: tuple[int, ...] = (2, 4)
    recompute: tuple[str, ...] = RECOMPUTE
    offload: tuple[bool, ...] = (False, True)
    sequence_parallel: tuple[bool, ...] = (True, False)
    tp_across_nodes: bool = True
    max_tp: int | None = None  # None: twice a node (the "tp across nodes" family, priced once to say why it loses)
    max_cp: int = 8
    min_cp_chunk: int = 1024  # cp only while each rank keeps this many tokens of the sequence (see below)
    max_pp: int = 128
    orders: tuple[tuple[str, ...], ...] | None = None  # None: every order that changes which dims are intra-node
    whole_batch_without_pp: bool = False
    runnable: Callable[[ParallelLayout], bool] | None = field(default=None, compare=False)
    refine: int = 6

    def __post_init__(self):
        if not set(self.schedules) <= set(SCHEDULES) or not set(self.recompute) <= set(RECOMPUTE):
            raise ValueError(f"schedules must come from {SCHEDULES} and recompute from {RECOMPUTE}")
        if not self.zero or not set(self.zero) <= {0, 1, 2, 3}:
            raise ValueError(f"zero must be a non-empty subset of (0, 1, 2, 3), got {self.zero!r}")

    @classmethod
    def train_gpt(cls, global_batch: int) -> SearchSpace:
        """What ``examples/train_gpt.py`` runs: dp/tp/sp/zero/cp, or a pipeline with dp/tp/sp/zero (interleaved
        with 2 stages per rank), no recomputation or offload, its mesh order (pp, dp, tp, cp)."""

        def runnable(layout: ParallelLayout) -> bool:
            try:
                layout.to_train_gpt_flags(global_batch)
            except ValueError:
                return False
            return True

        return cls(virtual_stages=(2,), recompute=("none",), offload=(False,), orders=(TRAIN_GPT_ORDER,),
                   whole_batch_without_pp=True, runnable=runnable)

    def allows(self, layout: ParallelLayout) -> bool:
        return self.runnable is None or self.runnable(layout)


@dataclass(frozen=True)
class Shape:
    """The sizes and mesh order of a layout: what a "family" of layouts shares before its per-step options."""

    dp: int
    tp: int
    pp: int
    cp: int
    ep: int
    order: tuple[str, ...]

    def base(self, **options) -> ParallelLayout:
        return ParallelLayout(dp=self.dp, tp=self.tp, pp=self.pp, cp=self.cp, ep=self.ep, order=self.order, **options)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _orders(sizes: dict[str, int], gpus_per_node: int, space: SearchSpace) -> list[tuple[str, ...]]:
    """One order per distinct answer to "which dims stay inside a node": tp innermost unless it alone fills
    the node anyway; the default order (pp, dp, cp, tp) first among equals."""
    if space.orders is not None:
        return list(space.orders)
    seen, out = set(), []
    default = ("pp", "dp", "cp", "tp")
    candidates = [default] + [(*outer, "tp") for outer in itertools.permutations(("pp", "dp", "cp"))]
    for order in candidates:
        probe = ParallelLayout(dp=sizes["dp"], tp=sizes["tp"], pp=sizes["pp"], cp=sizes["cp"], order=order)
        key = tuple(sorted((d, v) for d, v in probe.intra_node(gpus_per_node).items() if sizes[d] > 1))
        if key not in seen:
            seen.add(key)
            out.append(order)
    return out


def shapes(world: int, gpus_per_node: int, space: SearchSpace, *, seq_len: int, experts: int = 0) -> Iterator[Shape]:
    """Every (dp, tp, pp, cp, ep) with dp*tp*pp*cp == world (ep dividing dp and the experts), tp a power of two
    (up to a node, or twice a node when ``space.tp_across_nodes``), cp within ``space.min_cp_chunk``, with each
    distinct mesh order."""
    max_tp = space.max_tp if space.max_tp is not None else 2 * gpus_per_node
    for tp in _divisors(world):
        if tp & (tp - 1) or tp > max_tp or (tp > gpus_per_node and not space.tp_across_nodes):
            continue
        for pp in _divisors(world // tp):
            if pp > space.max_pp:
                continue
            for cp in _divisors(world // (tp * pp)):
                if cp > space.max_cp or (cp > 1 and seq_len // cp < space.min_cp_chunk):
                    continue
                dp = world // (tp * pp * cp)
                sizes = {"dp": dp, "tp": tp, "pp": pp, "cp": cp}
                eps = [e for e in _divisors(dp) if experts and experts % e == 0] if experts else [1]
                for ep in eps:
                    for order in _orders(sizes, gpus_per_node, space):
                        yield Shape(dp, tp, pp, cp, ep, order)


# Initializers that fill a tensor in place: on meta they only cost time (torch runs their Python reference
# implementations, ~0.2 s each for a GPT-3 layer), and a parameter count needs no values.
_INITIALIZERS = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                           "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "constant_", "orthogonal_",
                           "fill_", "zero_"})


class _SkipInitializers(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _INITIALIZERS:
            return args[0] if args else kwargs.get("tensor")
        return func(*args, **kwargs)


def build_on_meta(workload, num_layers: int):
    """``workload.build(num_layers)`` on the meta device, initializers skipped: shapes only, nothing allocated."""
    with torch.device("meta"), _SkipInitializers():  # ours innermost: it sees the initializers first
        return workload.build(num_layers)


def parameter_counts(workload) -> tuple[int, int]:
    """(parameters per layer, parameters outside the layers) of the workload's model, from ``build(1)`` and
    ``build(2)`` on the meta device (nothing allocated, initializers skipped). A model that cannot be built on
    meta falls back to a GPT's count from the workload's sizes (12 h^2 + 13 h a layer; embeddings, positions,
    the final norm)."""
    try:
        one, two = (sum(p.numel() for p in build_on_meta(workload, n).parameters()) for n in (1, 2))
        return two - one, 2 * one - two
    except Exception:  # noqa: BLE001 - any model code: the fallback is stated in the docstring
        h = workload.hidden
        return 12 * h * h + 13 * h, workload.vocab_size * h + workload.seq_len * h + 2 * h


STATE_KINDS = ("parameters", "gradients", "optimizer")


@dataclass(frozen=True)
class StateBound:
    """Model-state bytes per device that a layout needs at least (see the module docstring)."""

    total_parameters: int
    bytes_per_parameter: tuple[tuple[str, float], ...]  # (kind, bytes) for parameters, gradients, optimizer

    @classmethod
    def calibrate(cls, workload, one_rank_estimate) -> StateBound:
        """From ``estimate`` of the one-rank layout: its state bytes per kind over the model's parameters."""
        per_layer, rest = parameter_counts(workload)
        total = per_layer * workload.num_layers + rest
        memory = one_rank_estimate.memory
        return cls(total, tuple((kind, memory.get(kind, 0) / total) for kind in STATE_KINDS))

    def bytes(self, layout: ParallelLayout) -> float:
        sharded = layout.tp * layout.pp * layout.ep
        dp_shards = {"parameters": layout.zero >= 3, "gradients": layout.zero >= 2, "optimizer": layout.zero >= 1}
        total = 0.0
        for kind, per_parameter in self.bytes_per_parameter:
            if kind == "optimizer" and layout.offload:
                continue  # on the host
            total += per_parameter * self.total_parameters / (sharded * (layout.dp if dp_shards[kind] else 1))
        return total

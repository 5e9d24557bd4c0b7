"""One training step of this rank, simulated: every collective, the memory by kind, the FLOPs by op.

``simulate_step(world, step, models=..., optimizers=...)`` runs ``step()`` (forward, backward, optimizer step:
whatever the program does) inside a ``simulated_world`` and returns a ``SimulatedStep``: data a cost model or a
planner reads (no printing, no hardware assumptions here).

``measure_step`` runs the same recording on a real world (gloo ranks, real tensors): the tests compare the two.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

from ..collectives import CommCounter
from ..dispatcher import DISPATCHER
from ..module_tracking import ModuleTracker
from .memory import SavedTensorTracker, state_memory, storage_key
from .meta_ops import LocalFlops

__all__ = ["Collective", "SimulatedStep", "simulate_step", "measure_step"]


@dataclass(frozen=True)
class Collective:
    """One collective this rank issued: its kind ("all_reduce", "all_gather", "reduce_scatter", "all_to_all",
    "broadcast", "scatter", "ring_shift", "send": a pipeline's point-to-point batch, its receives being its peers'
    sends...), its mesh dim's name, the bytes this rank sent, the aten op that
    issued it (None: a layout's hook, outside any op), the innermost module running and "forward"/"backward"."""

    collective: str
    mesh_dim: str
    bytes: int
    op: str | None
    module: str
    phase: str


@dataclass
class SimulatedStep:
    """What one rank does in one step. ``memory``: bytes by kind ("parameters", "gradients", "optimizer" after the
    step; "activations": the peak of the tensors saved for backward during it). ``flops_by_op``: FLOPs of this
    rank's local ops by aten op; ``flops_by_module``: by (module path, phase)."""

    world_size: int
    rank: int
    collectives: list[Collective] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)
    flops_by_op: dict[str, int] = field(default_factory=dict)
    flops_by_module: dict[tuple[str, str], int] = field(default_factory=dict)

    def bytes(self, collective: str | None = None, mesh_dim: str | None = None) -> int:
        return sum(c.bytes for c in self._matching(collective, mesh_dim))

    def count(self, collective: str | None = None, mesh_dim: str | None = None) -> int:
        return len(self._matching(collective, mesh_dim))

    def bytes_by_collective(self) -> dict[tuple[str, str], int]:
        """{(collective, mesh dim): bytes sent}, as ``CommCounter.sent_bytes``."""
        out = Counter()
        for c in self.collectives:
            out[c.collective, c.mesh_dim] += c.bytes
        return dict(out)

    def counts_by_collective(self) -> dict[tuple[str, str], int]:
        return dict(Counter((c.collective, c.mesh_dim) for c in self.collectives))

    @property
    def flops(self) -> int:
        return sum(self.flops_by_op.values())

    @property
    def state_bytes(self) -> int:
        return sum(v for k, v in self.memory.items() if k != "activations")

    def _matching(self, collective, mesh_dim):
        return [c for c in self.collectives
                if (collective is None or c.collective == collective) and (mesh_dim is None or c.mesh_dim == mesh_dim)]


class _Recorder(CommCounter):
    """A CommCounter that also keeps every collective, in order, with its op and module."""

    def __init__(self, tracker):
        super().__init__(tracker)
        self.calls: list[Collective] = []

    def record(self, collective, mesh_dim_name, num_bytes, op=None):
        super().record(collective, mesh_dim_name, num_bytes, op)
        module, phase = self._tracker.current()
        name = None if op is None else str(getattr(op, "__name__", op))
        self.calls.append(Collective(collective, mesh_dim_name, int(num_bytes), name, module, phase))


def _record_step(step, models, optimizers, mode, world_size, rank) -> SimulatedStep:
    models, optimizers = list(models), list(optimizers)
    params = {storage_key(p) for m in models for p in m.parameters()}
    tracker = ModuleTracker()
    saved = SavedTensorTracker(skip_keys=params)
    recorder = _Recorder(tracker)
    with tracker, (mode.planning_uncounted() if mode is not None else contextlib.nullcontext()):
        DISPATCHER.comm_counters.append(recorder)
        if mode is not None:
            mode.counting, mode.module_of = True, tracker.current
        try:
            with saved.hooks():
                step()
        finally:
            DISPATCHER.comm_counters.remove(recorder)
            if mode is not None:
                mode.counting, mode.module_of = False, None
    memory = state_memory(models, optimizers)
    memory["activations"] = saved.peak_bytes
    return SimulatedStep(
        world_size, rank, recorder.calls, memory,
        dict(mode.flops_by_op) if mode is not None else {},
        dict(mode.flops_by_module) if mode is not None else {},
    )


def simulate_step(world, step, *, models, optimizers=()) -> SimulatedStep:
    """Run ``step()`` as ``world``'s rank (``with simulated_world(n, rank=r) as world``) and record it.

    ``models``: the modules whose parameters this rank holds (a pipeline rank: its stages); ``optimizers``: theirs.
    Memory is read after ``step()`` returns: call it before ``zero_grad`` so gradients and state are alive."""
    world.mode.flops_by_op.clear()
    world.mode.flops_by_module.clear()
    return _record_step(step, models, optimizers, world.mode, world.world_size, world.rank)


def measure_step(step, *, models, optimizers=()) -> SimulatedStep:
    """The same record of a real step on this rank's real world (collectives, memory, FLOPs of the local ops)."""
    import torch.distributed as dist

    with LocalFlops() as mode:
        return _record_step(step, models, optimizers, mode, dist.get_world_size(), dist.get_rank())

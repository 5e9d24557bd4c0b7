"""The order ZeRO-3 units run in and the communication in flight between them (``fully_shard``, zero_stage3.py).

One ``_Schedule`` is shared by every ``fully_shard`` unit of a model. It records the units' forward order and
backward order on the first step (the same on every rank: module calls and autograd's order decide it), so
that from the second step on each unit can prefetch the next one's all-gather, and it holds the gradient
reduce-scatters in flight: each unit's reduce-scatter is started when its backward ends and waited for when
the next unit's starts (one in flight, so at most one unit's whole gradients wait in a flat buffer, as FSDP2
does) or when backward ends; only then do the reduced shards land in ``.grad``. Under HSDP (zero_hybrid.py) the
landing starts the all-reduce of the shards across replicas, waited for one unit later or when backward ends.

``timeline``: a list to record into (None: nothing recorded). Each entry is (what, unit label, start, end) in
``time.perf_counter()`` seconds: "wait all-gather" / "wait re-gather" / "wait reduce-scatter" / "wait replica
all-reduce" (the time this rank was blocked on a collective: exposed communication), "forward" (a unit's
forward, from its pre-hook to its post-hook) and "reduce-scatter issued" (an instant).
benchmarks/zero3_overlap.py draws it.
"""

from __future__ import annotations

import contextlib
import time

import torch

__all__ = ["Schedule"]


class Schedule:
    """The units' order, the reduce-scatter in flight and the optional timeline (module docstring)."""

    def __init__(self):
        self.forward_order: list = []
        self.backward_order: list = []
        self.forward_recorded = self.backward_recorded = False
        self.depth = 0  # units inside a forward right now
        self.backward_started = False
        self.boundary = None  # the outermost unit's local-compute boundary while a local forward runs
        self.reducing: list = []  # [(unit, pending reduce-scatter, where each lands)]: at most one outside end_backward
        self.syncing: list = []  # HSDP's all-reduces across replicas in flight (zero_hybrid.ReplicaSync)
        self.timeline: list | None = None

    def next_after(self, order: list, unit):
        if unit in order:
            i = order.index(unit)
            return order[i + 1] if i + 1 < len(order) else None
        return None

    def end_forward(self) -> None:
        self.forward_recorded = True
        for unit in self.forward_order:
            unit.drop_prefetch()  # a unit this forward did not call: its gather is waited for and dropped

    def start_backward(self, unit) -> None:
        """Called by every unit when its backward first runs: ends the backward with ``end_backward``."""
        if not self.backward_started:
            self.backward_started = True
            torch.autograd.Variable._execution_engine.queue_callback(self.end_backward)
        if not self.backward_recorded and unit not in self.backward_order:
            self.backward_order.append(unit)

    def reduce_in_flight(self, unit, pending, specs) -> None:
        """``unit``'s reduce-scatter has been started: finish the one before it (it had this unit's backward to
        move), keep this one in flight."""
        self.finish_reductions(final=False)
        self.reducing.append((unit, pending, specs))

    def finish_reductions(self, final: bool = True) -> None:
        """Wait for the replica all-reduces started before (HSDP), then for the reduce-scatters in flight, whose
        landing may start new all-reduces: left in flight unless ``final``."""
        self._finish_syncs()
        while self.reducing:
            unit, pending, specs = self.reducing.pop(0)
            with self.timed("wait reduce-scatter", unit):
                locals_ = pending.wait()
            unit.land_gradients(locals_, specs)
        if final:
            self._finish_syncs()

    def _finish_syncs(self) -> None:
        while self.syncing:
            sync = self.syncing.pop(0)
            with self.timed("wait replica all-reduce", sync.unit):
                sync.wait()

    def end_backward(self) -> None:
        self.finish_reductions()
        self.backward_recorded, self.backward_started = True, False
        for unit in self.backward_order:
            unit.drop_regather()

    # -- the timeline -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def timed(self, what: str, unit):
        if self.timeline is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timeline.append((what, unit.label, start, time.perf_counter()))

    def mark(self, what: str, unit, start: float | None = None) -> None:
        if self.timeline is not None:
            now = time.perf_counter()
            self.timeline.append((what, unit.label, now if start is None else start, now))

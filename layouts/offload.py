"""ZeRO-Offload's overlapped optimizer step for ZeRO-3: each ``fully_shard`` unit's shards are stepped on a side
thread as soon as their gradients are reduced, and the unit's next all-gather waits for that step only.

Why: with ``offload=CPUOffload()`` the shards, their gradients and the optimizer state live in host memory and the
optimizer step runs on the host, which is slow (ZeRO-Offload, Ren et al. 2021: the CPU Adam step is the
bottleneck they hide). Stepping the whole model after backward leaves the device idle for all of it. A unit's
shards are final once its reduce-scatter has landed (every later unit of the backward touches other shards), and
nothing reads them again until the unit's next gather: so its step can run during the rest of the backward and
the next forward of the units before it. ZeRO-Offload's delayed parameter update goes further (the step of
iteration i overlaps the whole of i+1, on one-step-stale parameters: a different algorithm); this one waits
where the parameters are needed, so every step equals the non-offloaded, non-overlapped step exactly.

How: the optimizer (an element-wise one: AdamW...) is built per unit over plain leaves that share the storage
of the shards' local blocks (local_step.py's reasoning: the update of each element reads only that element, so
the step of each block is the block of the step of the whole; the state is per block, in host memory). When a
unit's gradients land (zero_stage3.py's ``land_gradients``), their local blocks become the leaves' gradients
and the step is queued on one side thread; the unit's next gather (its forward, its prefetch, or a re-gather)
waits for it. No collective runs on the side thread: every rank's collectives keep their order.

    fully_shard(block, mesh, offload=CPUOffload()) ...; fully_shard(model, mesh, offload=CPUOffload())
    stepper = OverlappedStep(model, torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    for x, y in batches:
        loss_fn(model(x), y).backward()     # no opt.step(): each unit's step starts as its gradients land
    stepper.wait()                          # before reading the parameters outside a forward (eval, save)

Gradient accumulation: ``stepper.set_requires_step(False)`` for the backwards before the last (their gradients
accumulate; with HSDP also ``set_requires_all_reduce``). Timeline (``schedule.timeline``, zero_schedule.py):
"host step" (on the side thread) and "wait host step" (the main thread blocked on it: the step not hidden).
Works without offload too (the step then runs where the shards are). Needs ``overlap=True`` (the gradients land
outside autograd, where the step is started).
"""

from __future__ import annotations

import concurrent.futures
import time

import torch
from torch import nn

from dtensor_plus.dtensor import DTensor

from . import local_step

__all__ = ["OverlappedStep", "OnHost"]


class OverlappedStep:
    """Per-unit optimizer steps of a ``fully_shard`` model on a side thread (module docstring)."""

    def __init__(self, module: nn.Module, optimizer_class=torch.optim.AdamW, **optimizer_kwargs):
        if optimizer_class not in local_step.ELEMENTWISE:
            names = ", ".join(c.__name__ for c in local_step.ELEMENTWISE)
            raise ValueError(f"OverlappedStep steps each shard's block on its own, exact only for an element-wise "
                             f"optimizer ({names}); {getattr(optimizer_class, '__name__', optimizer_class)} reads "
                             f"across elements: step it after backward instead")
        self.units = [m._zero_state for m in module.modules() if hasattr(m, "_zero_state")]
        if not self.units:
            raise ValueError(f"OverlappedStep: no fully_shard module in {type(module).__name__}'s tree; call "
                             f"fully_shard on its blocks and its root first")
        if not all(u.overlap for u in self.units):
            raise ValueError("OverlappedStep needs fully_shard(..., overlap=True): with overlap off the gradients "
                             "come back through autograd, not where the step is started")
        for unit in self.units:
            if unit.stepper is not None:
                raise ValueError(f"{unit.label}'s fully_shard unit already has an OverlappedStep")
            unit.stepper = self
        self.optimizer_class, self.optimizer_kwargs = optimizer_class, optimizer_kwargs
        self.optimizers: dict = {}  # unit -> (its optimizer, [(shard, leaf sharing the shard's local block)])
        self.pending: dict = {}  # unit -> the Future of its step
        self.requires_step = True
        self.side = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="zero3-host-step")

    def set_requires_step(self, requires_step: bool) -> None:
        """Whether the next backward steps the units as their gradients land (False: accumulate only)."""
        self.requires_step = bool(requires_step)

    def landed(self, unit) -> None:
        """``unit``'s reduced gradients are in its shards' ``.grad``: queue its step on the side thread."""
        if not self.requires_step:
            return
        optimizer, pairs = self._optimizer(unit)
        for shard, leaf in pairs:
            grad = shard.grad
            if grad is not None and grad.placements != shard.placements:
                raise ValueError(f"{unit.label}: a gradient is {grad.placements}, its shard {shard.placements}: "
                                 f"not reduced yet (HSDP with set_requires_all_reduce(model, False)?); step only "
                                 f"after the backward that synchronizes the replicas")
            leaf.grad = None if grad is None else grad._local_tensor
        self.pending[unit] = self.side.submit(self._step, unit, optimizer)

    def _step(self, unit, optimizer) -> None:
        start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if unit.schedule.timeline is not None:  # list.append is atomic: safe from this thread
            unit.schedule.timeline.append(("host step", unit.label, start, time.perf_counter()))

    def wait(self, unit=None) -> None:
        """Wait for ``unit``'s step (every unit's when None); its gradients are then consumed (``.grad`` None)."""
        for u in [unit] if unit is not None else list(self.pending):
            future = self.pending.pop(u, None)
            if future is None:
                continue
            with u.schedule.timed("wait host step", u):
                future.result()  # an exception of the step is raised here
            for _, _, shard in u.entries:
                shard.grad = None

    def close(self) -> None:
        """Wait for every step, stop the side thread and detach from the units."""
        self.wait()
        self.side.shutdown()
        for unit in self.units:
            unit.stepper = None

    def _optimizer(self, unit):
        """The unit's optimizer over leaves sharing its shards' local blocks (rebuilt with its state carried over
        when the unit's Parameters were replaced, e.g. by ``to_empty``)."""
        shards = [shard for _, _, shard in unit.entries]
        built = self.optimizers.get(unit)
        if built is not None and [s for s, _ in built[1]] == shards and all(
                leaf.data_ptr() == s._local_tensor.data_ptr() for s, leaf in built[1]):
            return built
        pairs = [(s, nn.Parameter(s._local_tensor.detach(), requires_grad=s.requires_grad)) for s in shards]
        optimizer = self.optimizer_class([leaf for _, leaf in pairs], **self.optimizer_kwargs)
        if built is not None and len(built[1]) == len(pairs):
            old_state = built[0].state
            for (_, old_leaf), (_, leaf) in zip(built[1], pairs):
                if old_leaf in old_state:
                    optimizer.state[leaf] = old_state[old_leaf]
        self.optimizers[unit] = (optimizer, pairs)
        return self.optimizers[unit]


class OnHost:
    """A tensor autograd saved, kept in host memory from forward to backward (``fully_shard(...,
    offload_activations=True)``: ZeRO-Infinity's activation offload, as torch's ``save_on_cpu`` does, but inside
    the units' own saved-tensor hooks, which are the innermost ones and would hide an outer hook). Copied to the
    host asynchronously from pinned memory on an accelerator; on a CPU mesh the host is the device and nothing
    moves, the unit still counts the bytes ("activations to host" / "activations to device")."""

    __slots__ = ("local", "spec", "device", "requires_grad", "unit")

    @staticmethod
    def save(unit, t: torch.Tensor):
        local = t._local_tensor if isinstance(t, DTensor) else t
        saved = OnHost()
        saved.spec, saved.device = (t._spec if isinstance(t, DTensor) else None), local.device
        saved.requires_grad = t.requires_grad
        if local.device.type == "cpu":
            saved.local = local
        else:
            saved.local = torch.empty_like(local, device="cpu", pin_memory=True).copy_(local, non_blocking=True)
        unit.offload_bytes["activations to host"] += local.numel() * local.element_size()
        saved.unit = unit
        return saved

    def materialize(self) -> torch.Tensor:
        local = self.local.to(self.device, non_blocking=True)
        self.unit.offload_bytes["activations to device"] += local.numel() * local.element_size()
        return local if self.spec is None else DTensor(local, self.spec, requires_grad=self.requires_grad)

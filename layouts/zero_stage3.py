"""ZeRO stage 3, FSDP2-style: ``fully_shard`` keeps a module's parameters dp-sharded and gathers them around its
forward and backward, one flat all-gather per module, with the next module's gather prefetched.

This file owns the gathering, freeing and re-gathering of one ``fully_shard`` module's parameters (its
"unit"), and the order units run in (``_Schedule``). Collectives come from ``redistribute_together``:

* forward: one flat all-gather of the unit's shards (cast to ``mp_policy.param_dtype`` first: half the bytes
  in bf16) binds the whole parameters to their modules; the next unit's all-gather (in the forward order
  recorded on the first step) is issued asynchronously, so it is in flight while this unit computes;
* tensors autograd saves that are views of a gathered whole are saved as (unit, parameter, view geometry), so
  the wholes are freed after forward; the first one backward unpacks re-gathers every saved parameter of the
  unit in one flat all-gather, and the next unit in backward order is prefetched the same way;
* the gather is one autograd Function per unit: its backward starts one flat reduce-scatter of all the unit's
  gradients (in ``mp_policy.reduce_dtype``) and leaves it in flight while backward goes on; it is waited for
  when the next unit's starts, or when backward ends, and the shards land in the fp32 leaves' ``.grad``
  (zero_schedule.py). ``overlap=False``: no prefetch, each reduce-scatter waited for in its unit's backward
  (the gradients then come back through autograd).

The outermost unit's forward runs on each rank's rows with plain tensors (zero_local.py): the gathers give
plain wholes, so no op inside dispatches through DTensor on dp. ``local_compute=False`` (or a case that
module lists) dispatches every op as DTensor instead; both are exact as one device.

Every decision depends on module call order and global metadata only, so every rank issues the same
collectives in the same order::

    for block in model.blocks:
        fully_shard(block, mesh)
    fully_shard(model, mesh)
"""

from __future__ import annotations

import collections
import time

import torch
from torch import nn

from dtensor_plus.dtensor import DTensor
from dtensor_plus.placements import Partial, Replicate
from dtensor_plus.redistribute import redistribute_together_async
from dtensor_plus.shared_parameters import assign, parameter_slots
from dtensor_plus.spec import DTensorSpec, TensorMeta

from . import local_step
from .precision import MixedPrecision
from .offload import OnHost
from .zero_compiled import bind_compiled, unbind_compiled
from .zero_hybrid import after_landing, gradient_placements, zero_mesh_dims
from .zero_local import SHARDED_FOR as _SHARDED_FOR
from .zero_local import LocalBoundary
from .zero_schedule import Schedule
from .zero_tied import adopt
from .zero_placement import (
    CPUOffload, check_dp_placement, compute_device, on_device, to_dtensor, with_placement,
    zero_placement,
)

__all__ = ["fully_shard"]

# _SHARDED_FOR, on a sharded Parameter: who holds it, in words ("Linear's weight"). A string, not the unit:
# deepcopy and pickling of the Parameter must not drag the unit (and through it the model) along.


class _Unit:
    """The parameters one ``fully_shard`` call owns and the hooks that gather and free them."""

    def __init__(self, mesh, mesh_dim: int, mp_policy: MixedPrecision | None, offload: CPUOffload | None,
                 label: str = "", local_compute: bool = True, overlap: bool = True, replicate_mesh_dim=None):
        self.mesh, self.mesh_dim, self.offload = mesh, mesh_dim, offload
        # HSDP (zero_hybrid.py): the mesh dim the model states are replicated on, its second gradient hop.
        self.replicate_mesh_dim, self.requires_all_reduce = replicate_mesh_dim, True
        self.label, self.overlap = label, overlap
        self.boundary = LocalBoundary(mesh, mesh_dim) if local_compute else None
        self.device = compute_device(mesh)
        self.param_dtype = mp_policy.param_dtype if mp_policy else None
        self.reduce_dtype = (mp_policy.reduce_dtype or mp_policy.param_dtype) if mp_policy else None
        self.entries: list[tuple[nn.Module, str, nn.Parameter]] = []  # (owner module, name, sharded leaf)
        # A Parameter shared by several modules (tied weights) is one entry; its other slots, by id(sharded leaf).
        self.tied_slots: dict[int, list[tuple[nn.Module, str]]] = {}
        self.schedule = Schedule()
        # id(gathered whole DTensor) -> (entry index, the whole), while forward runs. By the parameter, never by
        # storage address: the wholes of one all-gather may all be views of its one output buffer.
        self.gathered: dict[int, tuple[int, DTensor]] = {}
        self.hooks_ctx = None
        self.prefetched = None  # an all-gather in flight for the next forward
        # Backward: how many saved views of each entry are still to be unpacked, and the re-gathered wholes
        # kept until their last one is. Counts, not weak references, decide when to gather: garbage
        # collection may differ between ranks, the order of packs and unpacks does not.
        self.unpacks_left: dict[int, int] = {}
        self.alive: dict[int, torch.Tensor] = {}
        self.regather_prefetched = None
        self.offload_activations = False  # saved activations kept in host memory (offload.py's OnHost)
        self.stepper = None  # an OverlappedStep (offload.py): steps the shards on a side thread after landing
        self.offload_bytes = collections.Counter()  # offload: bytes copied "to device" / "to host"

    def add(self, shard: nn.Parameter, slots: list[tuple[nn.Module, str]]) -> None:
        """Own ``shard``, held by every one of ``slots`` (several for tied weights)."""
        (owner, name), *others = slots
        self.entries.append((owner, name, shard))
        if others:
            self.tied_slots[id(shard)] = others
        shard.__dict__[_SHARDED_FOR] = " and ".join(f"{type(m).__name__}'s {key}" for m, key in slots)

    def _follow_replaced_parameters(self) -> None:
        """Own the Parameters the slots hold now: ``module.to_empty(device=...)`` on a model sharded on the meta
        device puts new Parameter objects there (torch's FSDP2 re-reads them at its lazy init too)."""
        for i, (owner, name, shard) in enumerate(self.entries):
            current = owner._parameters.get(name)
            if current is not shard and isinstance(current, DTensor) and current._spec == shard._spec:
                self.entries[i] = (owner, name, current)
                if id(shard) in self.tied_slots:
                    self.tied_slots[id(current)] = self.tied_slots.pop(id(shard))
                current.__dict__[_SHARDED_FOR] = shard.__dict__.get(_SHARDED_FOR)
                current.__dict__[local_step.TAG] = True

    def slots(self, index: int) -> list[tuple[nn.Module, str]]:
        """Every (module, name) that holds entry ``index``'s parameter."""
        owner, name, shard = self.entries[index]
        return [(owner, name), *self.tied_slots.get(id(shard), ())]

    # -- the collectives ------------------------------------------------------------------------------------

    def _compute_shards(self, indices) -> list[DTensor]:
        """The shards to gather, in the compute dtype (a local cast: the all-gather moves param_dtype bytes).
        Built from the local blocks, not by DTensor ops (detach, to): a gather dispatches nothing."""
        if self.stepper is not None:
            self.stepper.wait(self)  # the shards' overlapped optimizer step has finished (offload.py)
        out = []
        for i in indices:
            shard = self.entries[i][2]
            if self.offload is not None:
                self.offload_bytes["to device"] += shard._local_tensor.numel() * shard._local_tensor.element_size()
            local = shard._local_tensor.detach().to(self.device, non_blocking=True)  # offload: host-to-device
            spec = shard._spec
            if self.param_dtype is not None and local.is_floating_point() and local.dtype != self.param_dtype:
                local = local.to(self.param_dtype)
                spec = DTensorSpec(spec.mesh, spec.placements, TensorMeta(spec.shape, spec.tensor_meta.stride, local.dtype))
            out.append(DTensor(local, spec))
        return out

    def _issue_gather(self, indices):
        shards = self._compute_shards(indices)
        targets = [with_placement(s.placements, self.mesh_dim, Replicate()) for s in shards]
        specs = [s._spec.with_placements(t) for s, t in zip(shards, targets)]
        return redistribute_together_async(shards, targets), specs

    def _take_gather(self) -> list[tuple[torch.Tensor, object]]:
        """(whole local tensor, its spec) of every entry: the prefetched all-gather, or one issued now."""
        with self.schedule.timed("wait all-gather", self):
            pending, self.prefetched = self.prefetched or self._issue_gather(range(len(self.entries))), None
            handle, specs = pending
            return list(zip(handle.wait(), specs))

    def prefetch(self) -> None:
        if self.prefetched is None and self.overlap:
            self.prefetched = self._issue_gather(range(len(self.entries)))

    def drop_prefetch(self) -> None:
        if self.prefetched is not None:
            self.prefetched[0].wait()
            self.prefetched = None

    # -- forward --------------------------------------------------------------------------------------------

    def pre_forward(self, module, args, kwargs):
        if torch.compiler.is_compiling():  # the gathers as traced front doors (zero_compiled.py)
            args, kwargs = bind_compiled(self, args, kwargs)
            if self.param_dtype is not None:
                args, kwargs = _cast_inputs(args, self.param_dtype), _cast_inputs(kwargs, self.param_dtype)
            return args, kwargs
        self._follow_replaced_parameters()
        schedule = self.schedule
        if schedule.depth == 0:
            schedule.backward_started = False
            schedule.finish_reductions()  # a backward that ended without its callback (an exception in it)
            if self.boundary is not None:
                moved = self.boundary.enter(module, args, kwargs)
                if moved is not None:  # the outermost unit's forward runs on this rank's rows (zero_local.py)
                    schedule.boundary, (args, kwargs) = self.boundary, moved
        if not schedule.forward_recorded and self not in schedule.forward_order:
            schedule.forward_order.append(self)
        schedule.depth += 1
        self.forward_started = time.perf_counter()
        wholes = _GatherUnit.apply(self, schedule.boundary is not None, *[shard for _, _, shard in self.entries])
        if schedule.forward_recorded:
            nxt = schedule.next_after(schedule.forward_order, self)
            if nxt is not None:
                nxt.prefetch()  # in flight while this unit computes
        for i, whole in enumerate(wholes):
            for owner, name in self.slots(i):
                owner.__dict__[name] = whole  # attribute lookup finds __dict__ before Module.__getattr__'s _parameters
            self.gathered[id(whole)] = (i, whole)
        self.hooks_ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self.hooks_ctx.__enter__()
        if self.param_dtype is not None:
            args, kwargs = _cast_inputs(args, self.param_dtype), _cast_inputs(kwargs, self.param_dtype)
        return args, kwargs

    def post_forward(self, module, args, kwargs, out):
        """Drop the gathered parameters: the module sees its sharded Parameters again; the outermost unit of a
        local forward puts its outputs back on the whole mesh."""
        if torch.compiler.is_compiling():
            unbind_compiled(self)
            return None
        if self.hooks_ctx is not None:
            self.hooks_ctx.__exit__(None, None, None)
            self.hooks_ctx = None
        for i in range(len(self.entries)):
            for owner, name in self.slots(i):
                owner.__dict__.pop(name, None)
        self.gathered.clear()
        schedule = self.schedule
        schedule.mark("forward", self, self.forward_started)
        schedule.depth -= 1
        if schedule.depth == 0:
            schedule.end_forward()
            boundary, schedule.boundary = schedule.boundary, None
            if boundary is not None:
                return boundary.exit(module, out)
        return None

    def pack(self, t: torch.Tensor):
        # A saved gathered parameter, or a view of one (autograd's _base: a weight's transpose), is saved as (unit,
        # entry, view geometry relative to the whole): the gathered whole is not kept alive by autograd, and
        # backward re-gathers it. Anything else (a view a rule computed into fresh memory) is saved as it is.
        # Local compute: the wholes and their views are plain tensors (the spec saved is then None). Activations go
        # to host memory with offload_activations (offload.py).
        if not isinstance(t, torch.Tensor):
            return t
        found = self.gathered.get(id(t)) or (t._base is not None and self.gathered.get(id(t._base)))
        local, whole_local = (_local_of(t), _local_of(found[1])) if found else (None, None)
        if not found or local.untyped_storage().data_ptr() != whole_local.untyped_storage().data_ptr():
            return OnHost.save(self, t) if self.offload_activations else t
        index = found[0]
        self.unpacks_left[index] = self.unpacks_left.get(index, 0) + 1
        offset = local.storage_offset() - whole_local.storage_offset()
        spec = t._spec if isinstance(t, DTensor) else None
        return _Regather(self, index, spec, (local.shape, local.stride(), offset), whole_local.stride())

    def unpack(self, saved):
        return saved.materialize() if isinstance(saved, (_Regather, OnHost)) else saved

    # -- backward -------------------------------------------------------------------------------------------

    def regather(self, index: int) -> torch.Tensor:
        """The whole local tensor of entry ``index`` in backward: alive already, or re-gathered now (or by the
        prefetch) with every other entry still to be unpacked (one all-gather), prefetching the next unit's.
        The whole is dropped here when its last saved view has been unpacked."""
        if index not in self.alive:
            self.schedule.start_backward(self)
            if self.regather_prefetched is not None:
                self._receive(self.regather_prefetched)
                self.regather_prefetched = None
            if index not in self.alive:
                self._receive(self._issue_regather(index))
            nxt = self.schedule.next_after(self.schedule.backward_order, self) if self.schedule.backward_recorded else None
            if self.overlap and nxt is not None and nxt.regather_prefetched is None and not nxt.alive and nxt._wanted():
                nxt.regather_prefetched = nxt._issue_regather()
        whole = self.alive[index]
        self.unpacks_left[index] = self.unpacks_left.get(index, 0) - 1
        if self.unpacks_left[index] <= 0:
            del self.alive[index]
        return whole

    def _wanted(self, also: int | None = None) -> list[int]:
        wanted = [i for i, left in self.unpacks_left.items() if left > 0 and i not in self.alive]
        return wanted + ([also] if also is not None and also not in wanted else [])

    def _issue_regather(self, also: int | None = None):
        """Start re-gathering every entry with views still to unpack (and ``also``): one flat all-gather."""
        indices = self._wanted(also)
        with torch.no_grad():
            handle, _ = self._issue_gather(indices)
        return handle, indices

    def _receive(self, pending) -> None:
        handle, indices = pending
        with self.schedule.timed("wait re-gather", self):
            self.alive.update(zip(indices, handle.wait()))

    def drop_regather(self) -> None:
        """After this unit's backward: nothing re-gathered stays alive here (a prefetch not used is waited for)."""
        if self.regather_prefetched is not None:
            self.regather_prefetched[0].wait()
            self.regather_prefetched = None
        self.alive.clear()
        self.unpacks_left.clear()

    def start_reduce(self, grads):
        """Start one reduce-scatter (per dtype / mesh dim) of the unit's gradients, in reduce_dtype, onto the
        shards: (pending, (index, placements) of each entry with a gradient: where it lands, gradient_placements).
        A plain gradient (local compute) is this rank's rows' contribution, Partial(sum) on dp, as the DTensor
        path's gradients are."""
        shards = [shard for _, _, shard in self.entries]
        present = [i for i, g in enumerate(grads) if g is not None]
        moved = []
        for i in present:
            g = grads[i]
            if self.reduce_dtype is not None:
                g = g.to(self.reduce_dtype)
            if not isinstance(g, DTensor):
                g = DTensor(g, self._partial_spec(shards[i], g.dtype))
            moved.append(g)
        targets = [gradient_placements(self, shards[i]) for i in present]
        # Landed outside autograd when a gradient stays Partial on the replicate dim (its leaf's layout differs).
        self.lands_itself = any(t != shards[i].placements for t, i in zip(targets, present))
        self.schedule.mark("reduce-scatter issued", self)
        return redistribute_together_async(moved, targets), list(zip(present, targets))

    def _partial_spec(self, shard: DTensor, dtype: torch.dtype) -> DTensorSpec:
        shape = shard._spec.shape
        stride = tuple(torch.empty(shape, device="meta").stride())
        placements = with_placement(shard.placements, self.mesh_dim, Partial())
        return DTensorSpec(self.mesh, placements, TensorMeta(shape, stride, dtype))

    def reduced(self, locals_, landing) -> list:
        """The reduced local shards as gradients of the shards (None where an entry had no gradient)."""
        out = [None] * len(self.entries)
        used = collections.Counter()  # bytes of the locals in each storage (by its StorageImpl: meta ones too)
        for t in locals_:
            used[t.untyped_storage()._cdata] += t.numel() * t.element_size()
        for (i, placements), local in zip(landing, locals_):
            if used[local.untyped_storage()._cdata] < local.untyped_storage().nbytes():
                # A view of a buffer mostly not ours (a row-parallel weight's shard cut from a wider reduce-scatter
                # output) would keep the whole buffer alive as this gradient: keep only our part.
                local = local.clone()
            shard = self.entries[i][2]
            spec = shard._spec if placements == shard.placements else shard._spec.with_placements(placements)
            if self.offload is not None:
                self.offload_bytes["to host"] += local.numel() * shard.element_size()
            out[i] = DTensor(local.to(shard.device, shard.dtype), spec)  # offload: to the host
        return out

    def land_gradients(self, locals_, landing) -> None:
        """A reduce-scatter started in backward has finished: its shards accumulate into ``.grad`` (autograd's
        accumulation, done here because the Function returned before the collective finished)."""
        for i, grad in enumerate(self.reduced(locals_, landing)):
            if grad is None:
                continue
            shard = self.entries[i][2]
            if shard.grad is None:
                shard.grad = grad
            elif isinstance(shard.grad, DTensor) and shard.grad._spec == grad._spec:
                shard.grad._local_tensor.add_(grad._local_tensor)
            else:
                shard.grad = shard.grad + grad
        after_landing(self)  # HSDP's second hop (zero_hybrid.py), then an OverlappedStep's step (offload.py)


class _GatherUnit(torch.autograd.Function):
    """forward: one flat all-gather of a unit's shards on dp (or the prefetched one) / backward: one flat
    reduce-scatter of their gradients back to the shards."""

    @staticmethod
    def forward(ctx, unit, local, *shards):
        ctx.unit = unit
        ctx.set_materialize_grads(False)
        wholes = unit._take_gather()
        if local:  # local compute: plain wholes (their gradients come back plain: this rank's contribution)
            # detach(): the same memory, but not a view of the gather's flat buffer, so a view of one whole (a
            # weight's transpose) has that whole as its _base and pack() finds it by the parameter.
            return tuple(whole.detach() for whole, _ in wholes)
        return tuple(DTensor(local, spec, requires_grad=s.requires_grad) for (local, spec), s in zip(wholes, shards))

    @staticmethod
    def backward(ctx, *grads):
        unit = ctx.unit
        unit.schedule.start_backward(unit)  # end_backward waits for the reduce-scatters still in flight
        unit.drop_regather()  # every op of this unit has run its backward: its re-gathered wholes may go
        pending, landing = unit.start_reduce(list(grads))
        if unit.overlap:  # in flight while the units before this one run their backward
            unit.schedule.reduce_in_flight(unit, pending, landing)
            return (None, None, *[None] * len(grads))
        with unit.schedule.timed("wait reduce-scatter", unit):
            locals_ = pending.wait()
        if unit.lands_itself:
            unit.land_gradients(locals_, landing)
            return (None, None, *[None] * len(grads))
        return (None, None, *unit.reduced(locals_, landing))


class _Regather:
    """A saved tensor that was a view of a gathered parameter: re-gathered on unpack (see ``_Unit.regather``).
    While one re-gathered whole is alive (e.g. one weight saved by two ops of one backward node) it is reused.

    ``geometry``: the view's (size, stride, storage offset from the whole's first element); ``whole_stride``: the
    forward whole's strides, which the view's strides are relative to."""

    def __init__(self, unit, index, spec, geometry, whole_stride):
        self.unit, self.index, self.spec, self.geometry, self.whole_stride = unit, index, spec, geometry, whole_stride

    def materialize(self) -> DTensor:
        whole = self.unit.regather(self.index)
        size, stride, offset = self.geometry
        if any(a != b for a, b, n in zip(whole.stride(), self.whole_stride, whole.shape) if n > 1):
            # Never seen (both wholes come out of one all-gather's contiguous cut), but a view is only right on
            # the forward whole's strides: copy into them rather than read the wrong elements.
            copy = torch.empty_strided(whole.shape, self.whole_stride, dtype=whole.dtype, device=whole.device)
            whole = copy.copy_(whole)
        view = whole.as_strided(size, stride, whole.storage_offset() + offset)
        return view if self.spec is None else DTensor(view, self.spec)


def _cast_inputs(args, dtype: torch.dtype):
    # As FSDP2's cast_forward_inputs: floating inputs enter in the compute dtype.
    cast = lambda a: a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
    return {k: cast(a) for k, a in args.items()} if isinstance(args, dict) else tuple(cast(a) for a in args)


def _local_of(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def fully_shard(
    module: nn.Module, mesh, *, mesh_dim: int | str | tuple | None = None, mp_policy: MixedPrecision | None = None,
    offload: CPUOffload | None = None, local_compute: bool = True, overlap: bool = True,
    offload_activations: bool = False,
) -> nn.Module:
    """ZeRO stage 3: shard ``module``'s parameters on the dp mesh dim, gather them around its forward.

    The module owns every parameter in its subtree not already owned by an inner ``fully_shard`` call, so call
    it on the blocks first and on the root last (as with FSDP2): the root's call links the units so that each
    prefetches the next. Inputs should be DTensors on ``mesh`` sharded on the batch dim
    (``distribute_tensor(x, mesh, [Shard(0)])``); the loss then is the global-batch loss and the gradients are
    exactly the single-device ones.

    Args:
        module: the module to shard (changed in place and returned).
        mesh: the device mesh; parameters already DTensors on it keep their other mesh dims' placements.
        mesh_dim: the data-parallel mesh dim (name or index); needed only on a mesh of more than one dim. A pair
            ``("replicate", "shard")`` is HSDP / MiCS (zero_hybrid.py): sharded on the second, replicated on the
            first (FSDP2's 2-D mesh order), gradients reduce-scattered on one then all-reduced on the other.
        mp_policy: ``MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``: the shards stay
            fp32 (the master), the all-gather and the compute run in param_dtype, floating inputs are cast to
            it, gradients are reduce-scattered in reduce_dtype and land on the shards in fp32.
        offload: ``CPUOffload()``: the shards (so their gradients and the optimizer's state and step) live in
            host memory; each gather copies them to the mesh's device first, gradients are copied back.
        local_compute: the outermost fully_shard module's forward runs on each rank's rows with plain tensors
            (layouts/zero_local.py: 1-D dp mesh; the cases it lists take the DTensor path); False: every op
            dispatched as DTensor. Both are exact as one device; the root's setting decides.
        overlap: prefetch the next unit's all-gather (forward and backward) and leave each unit's gradient
            reduce-scatter in flight until the next one starts or backward ends (its shards then land in
            ``.grad`` outside autograd: ``torch.autograd.grad`` does not return them, post-accumulate-grad hooks
            do not run); False: every collective waited for where it is issued (for measuring and debugging).
        offload_activations: the tensors autograd saves inside the module (not its gathered parameters) are
            copied to host memory in forward and back in backward (offload.py's ``OnHost``).

    Traffic per step, for the owned parameters (bytes B in the gather dtype): one all-gather in forward, one
    in backward of the parameters some op saved, one reduce-scatter of the gradients (in reduce_dtype), each
    (n-1)/n x B and each ONE collective per unit.

    Example::

        fully_shard(model, mesh, mp_policy=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        opt = torch.optim.AdamW(model.parameters())   # state tensors are DTensors sharded like the parameters
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fully_shard needs an nn.Module, got {type(module).__name__}")
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecision):
        raise TypeError(f"mp_policy must be a MixedPrecision, got {type(mp_policy).__name__}")
    if offload is not None and not isinstance(offload, CPUOffload):
        raise TypeError(f"offload must be a CPUOffload, got {type(offload).__name__}")
    replicate_k, k = zero_mesh_dims(mesh, mesh_dim)
    unit = _Unit(mesh, k, mp_policy, offload, type(module).__name__, local_compute, overlap, replicate_k)
    unit.offload_activations = bool(offload_activations)
    # Each Parameter once, with every slot holding it (tied weights: one entry, one gather, one gradient).
    for param, slots in parameter_slots(module, prune=lambda child: hasattr(child, "_zero_state")):
        if _SHARDED_FOR in param.__dict__:  # a shared Parameter an inner call sharded through another slot
            adopt(unit, param, slots, module)
            continue
        dt = to_dtensor(param, mesh)
        if dt.placements[k].is_shard():
            # Already split on dp by another layout (experts with ep = dp): each rank holds whole blocks of its
            # own, gradients are exact per rank, so there is nothing to gather or reduce-scatter.
            assign(slots, param)
            continue
        for mesh_dim_index in (k, replicate_k) if replicate_k is not None else (k,):
            check_dp_placement(dt, mesh_dim_index, "fully_shard")
        sharded = dt.redistribute(placements=with_placement(dt.placements, k, zero_placement(dt, k)))  # local chunk
        with torch.no_grad():  # the chunk is a view of the whole: a copy lets the whole's storage go
            sharded = sharded.detach().clone()
        if offload is not None:
            sharded = on_device(sharded, "cpu", offload.pin_memory)
        sharded = nn.Parameter(sharded, requires_grad=param.requires_grad)
        sharded.__dict__[local_step.TAG] = True  # an element-wise optimizer steps it on its block (local_step.py)
        assign(slots, sharded)
        unit.add(sharded, [(slot.owner, slot.key) for slot in slots])
    for inner in module.modules():  # one schedule for the whole tree, so units prefetch across it
        if hasattr(inner, "_zero_state"):
            inner._zero_state.schedule = unit.schedule
    module._zero_state = unit
    local_step.install()
    module.register_forward_pre_hook(unit.pre_forward, with_kwargs=True)
    module.register_forward_hook(unit.post_forward, with_kwargs=True, always_call=True)  # also on an exception
    return module

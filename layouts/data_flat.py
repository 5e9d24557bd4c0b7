"""replicate's gradients landing in place: one flat buffer per bucket, each local leaf's .grad a view of it.

Why: on a 1-D dp mesh every parameter computes through a plain local leaf (layouts/data_local.py). Handing each
leaf's gradient to a Python bucket, packing the bucket into a new buffer, unpacking the reduced buffer and
wrapping each piece in a new DTensor cost about 1.5 ms of Python a step on a small GPT, where DDP's reducer
(C++) costs nothing visible. So, as DDP's ``gradient_as_bucket_view`` does it (our own code):

    layout      the parameters, in the order their gradients landed in the first backward (before it: the
                reverse of their registration order, DDP's first guess), cut into buckets by bytes (the first
                closes at 1 MiB, the others at ``bucket_cap_mb``) and by dtype (``dtensor_plus.buckets.Buckets``
                groups them); each bucket owns one flat buffer and, per parameter, a view of it shaped like the
                parameter and a DTensor over that view in the parameter's layout, made once.
    arm         before a backward (the forward's pre-hook, once per backward): each leaf's .grad is set to
                its view, the buffer zeroed, so autograd's AccumulateGrad adds the gradient in place: no copy,
                no Python per parameter until it lands.
    land        one small post-accumulate hook per leaf counts the bucket's gradients; when a bucket's last one
                lands its all-reduce starts, asynchronously and in place in the buffer (no copy out and
                back), buckets always started in layout order (the same order on every rank, whatever
                order they fill in). Except the last bucket of a layout built in the landing order: its
                gradients land as backward ends, when it would start anyway, so its leaves have no hook (no
                Python per gradient, as DDP's C++ hooks cost nothing visible): each keeps .grad None, autograd
                puts its gradient there, and the end of backward (queued as backward reaches the module's
                outputs) adds the ones that landed into their zeroed views in one call.
    deliver     when backward ends the rest start, each is waited for, and each parameter whose gradient
                landed gets .grad = its DTensor over the reduced buffer (Replicate on dp): the same object every
                step, nothing made.

One device's semantics are kept: a parameter whose gradient did not land keeps .grad None; a .grad already
there (accumulation over micro-batches, zero_grad(set_to_none=False), a gradient set by hand) is added to:
the leaves then land in a second buffer ("accumulate" mode) and the reduced sum is added onto .grad after
the all-reduce; a .grad the user still holds from an earlier step (a reference kept across zero_grad
(set_to_none=True)) is never overwritten: the bucket then takes a new buffer. A backward with no forward
since the last one (retain_graph) arms itself at its first landing (that gradient is copied once).
"""

from __future__ import annotations

import sys
from functools import partial
from itertools import compress, repeat
from operator import attrgetter, is_

import torch

from dtensor_plus import collectives
from dtensor_plus.buckets import Buckets, unflatten
from dtensor_plus.dtensor import DTensor

__all__ = ["FlatGradients", "deposit"]

_GRAD = attrgetter("grad")


def deposit(param, local: torch.Tensor) -> None:
    """A reduced gradient block (``param``'s layout) onto ``param.grad``: set, or added to one there already."""
    grad = param.grad
    if grad is None:
        param.grad = DTensor(local, param._spec)
    elif isinstance(grad, DTensor) and grad._spec == param._spec:
        grad._local_tensor.add_(local)
    else:  # a gradient in another layout (set by hand): the DTensor sum decides
        param.grad = grad + DTensor(local, param._spec)


def _reference_counts(objects: list) -> list[int]:
    return list(map(sys.getrefcount, objects))


def _storage_uses(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _Bucket:
    """One flat buffer and the parameters whose gradients it holds (module docstring)."""

    def __init__(self, params: list, leaves: list, hooked: bool = True):
        self.params, self.leaves = params, leaves
        self.hooked = hooked  # its leaves' hooks count its gradients in; else ``collect`` finds them at the end
        self.scratch = self.scratch_views = None  # accumulate mode's buffer, made when first needed
        self.landed = [False] * len(params)
        self.remaining, self.fresh, self.pending = len(params), True, None
        self.targets: list = []  # the views the leaves land in this backward
        self._new_buffer()

    def _new_buffer(self) -> None:
        """A flat buffer, its views and the DTensors over them; their reference counts when only we hold them
        (``_unshared`` compares)."""
        like = [p._local_tensor for p in self.params]
        self.flat = torch.zeros(sum(t.numel() for t in like), dtype=like[0].dtype, device=like[0].device)
        self.views = unflatten(self.flat, like)
        self.wrappers = [DTensor(view, p._spec) for view, p in zip(self.views, self.params)]
        self.counts = (_reference_counts(self.wrappers), _reference_counts(self.views), _storage_uses(self.flat))

    def _unshared(self) -> bool:
        """Whether nothing but this bucket holds its buffer (no .grad of an earlier step kept by the user)."""
        wrapper_counts, view_counts, uses = self.counts
        return (_storage_uses(self.flat) == uses and _reference_counts(self.wrappers) == wrapper_counts
                and _reference_counts(self.views) == view_counts)

    def arm(self) -> None:
        """Zero the buffer the gradients land in this backward and point a hooked bucket's leaves' .grad at
        their views (module docstring)."""
        self.fresh = all(map(is_, map(_GRAD, self.params), repeat(None)))  # no .grad: each lands in its view
        if self.fresh:
            if not self._unshared():
                self._new_buffer()
            self.flat.zero_()
            self.targets = self.views
        else:
            if self.scratch is None:
                self.scratch = torch.empty_like(self.flat)
                self.scratch_views = unflatten(self.scratch, self.views)
            self.scratch.zero_()
            self.targets = self.scratch_views
        if self.hooked:  # unhooked leaves keep .grad None (deliver left it so): autograd puts theirs there
            for leaf, view in zip(self.leaves, self.targets):
                leaf.grad = view
        self.landed = [False] * len(self.params)
        self.remaining = len(self.params)

    def collect(self) -> None:
        """An unhooked bucket at the end of backward: the gradients autograd left on its leaves, added into
        their zeroed views (one call; an add, as AccumulateGrad's, takes a sparse gradient too); the leaves
        without one did not land."""
        grads = list(map(_GRAD, self.leaves))
        self.landed = [g is not None for g in grads]
        if any(self.landed):
            torch._foreach_add_(list(compress(self.targets, self.landed)), list(compress(grads, self.landed)))
        self.remaining = 0

    def start(self, mesh, mesh_dim: int, launcher=None) -> None:
        buffer = self.flat if self.fresh else self.scratch
        if mesh.size(mesh_dim) > 1:
            # In place: the views the gradients are hold the sum when it is waited for (no copy out and back)
            pending = (launcher(buffer, mesh, mesh_dim) if launcher is not None
                       else collectives.all_reduce(buffer, mesh, mesh_dim, "sum", async_op=True, in_place=True))
            self.pending = (buffer, pending)

    def deliver(self) -> None:
        """Wait for the all-reduce and put each landed gradient on its parameter's .grad."""
        if self.pending is not None:
            buffer, pending = self.pending
            self.pending = None
            reduced = pending.wait()
            if reduced is not buffer:  # a launcher's all-reduce into a new tensor: back into the buffer the views see
                buffer.copy_(reduced)
        if self.fresh:
            for param, wrapper, landed in zip(self.params, self.wrappers, self.landed):
                if landed:
                    param.grad = wrapper
        elif all(self.landed) and all(p.grad is w for p, w in zip(self.params, self.wrappers)):
            self.flat.add_(self.scratch)  # every .grad is ours: one add for the bucket
        else:
            for param, view, landed in zip(self.params, self.scratch_views, self.landed):
                if landed:
                    deposit(param, view.clone() if param.grad is None else view)  # scratch is zeroed next time
        for leaf in self.leaves:  # disarmed: a backward with no forward first arms itself (``_landed``)
            leaf.grad = None


class FlatGradients:
    """The plain local leaves of one ``replicate`` call and their flat buckets (module docstring)."""

    def __init__(self, mesh, mesh_dim: int, cap_bytes: float, first_cap_bytes: float | None, launcher=None):
        self.mesh, self.mesh_dim = mesh, mesh_dim
        self.launcher = launcher  # replicate's all_reduce_launcher (None: collectives.all_reduce, async)
        self.cap_bytes, self.first_cap_bytes = cap_bytes, first_cap_bytes
        self.leaves: dict = {}  # id(parameter) -> (parameter, its current leaf), in registration order
        self.recording: list | None = None  # the parameters as their gradients land in a first-guess layout's first backward
        self.landing_order: list | None = None  # a complete recording, waiting for the moment to rebuild in it
        self.buckets: list[_Bucket] = []
        self.slots: dict = {}  # id(a leaf of the layout) -> (its bucket, its index there)
        self.stale = True  # a leaf was added or replaced since the layout was built
        self.armed = self.flush_queued = False
        self.hooks: dict = {}  # id(leaf) -> (leaf, its hook's handle), for the hooked buckets' leaves
        self.next_start = 0  # the first bucket not started in this backward

    def hook(self, param, leaf) -> None:
        """Register ``leaf`` as ``param``'s; the layout hooks it or not (``_build``). Returns None: no hook for
        the caller to put on it."""
        self.leaves[id(param)] = (param, leaf)
        self.stale = True

    def backward_started(self) -> None:
        """Called as a backward reaches the replicated module's outputs: its end flushes the buckets (an
        unhooked bucket's leaves call nothing)."""
        if not self.flush_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
            self.flush_queued = True

    def arm(self) -> None:
        """Before a backward: each bucket armed (module docstring); once per backward."""
        if self.armed and not self.stale:
            return
        if self.stale or self._reorder():
            self._build()
        for bucket in self.buckets:
            bucket.arm()
        self.armed, self.next_start = True, 0

    def _reorder(self) -> bool:
        """Whether to rebuild the layout in the recorded landing order now: once, when no .grad holds a buffer."""
        return self.landing_order is not None and all(p.grad is None for p, _ in self.leaves.values())

    def _build(self) -> None:
        entries, order, self.landing_order = list(self.leaves.values()), self.landing_order, None
        if order is not None and {id(p) for p in order} == set(self.leaves):
            entries, self.recording = [self.leaves[id(p)] for p in order], None
        else:
            entries.reverse()  # DDP's first guess: backward meets the last registered first
            self.recording = []  # this layout's first backward says the real order
        grouping = Buckets(self.cap_bytes, self.first_cap_bytes)
        groups = []
        for param, leaf in entries:
            local = param._local_tensor
            full = grouping.add((local.dtype, local.device), (param, leaf), local.numel() * local.element_size())
            if full is not None:
                groups.append(full)
        groups += [items for _, items in grouping.drain()]
        # In the landing order, the last bucket's gradients land as backward ends: it starts then, unhooked (no
        # Python per gradient); a first guess hooks every leaf to record the order.
        unhooked = len(groups) - 1 if self.recording is None else len(groups)
        self.buckets = [_Bucket([p for p, _ in items], [leaf for _, leaf in items], hooked=b != unhooked)
                        for b, items in enumerate(groups)]
        self.slots = {id(leaf): (b, i) for b in self.buckets for i, leaf in enumerate(b.leaves)}
        self._hook_leaves()
        self.stale = False

    def _hook_leaves(self) -> None:
        """Each leaf of a hooked bucket hooked once (``_landed``), every other leaf's hook removed."""
        hooks, self.hooks = self.hooks, {}
        for bucket in self.buckets:
            if bucket.hooked:
                for param, leaf in zip(bucket.params, bucket.leaves):
                    held = hooks.pop(id(leaf), None)
                    if held is None or held[0] is not leaf:
                        handle = leaf.register_post_accumulate_grad_hook(partial(self._landed, param))
                        held = (leaf, handle)
                    self.hooks[id(leaf)] = held
        for _, handle in hooks.values():
            handle.remove()

    def _landed(self, param, leaf) -> None:
        self.backward_started()  # its end starts and delivers every bucket
        grad = leaf.grad
        if not self.armed:  # no forward armed this backward: arm now, this gradient is copied in below
            self.arm()
        slot = self.slots.get(id(leaf))
        if slot is None or slot[0].leaves[slot[1]] is not leaf:
            raise RuntimeError("replicate: a local leaf's gradient landed that the armed layout does not hold (a "
                               "leaf made outside replicate's forward?); run the forward of the replicated module")
        bucket, i = slot
        target = bucket.targets[i]
        if grad is not target:  # not accumulated in place (armed after it landed): one copy
            target.add_(grad)
            leaf.grad = target
        if self.recording is not None:
            self.recording.append(param)
        if not bucket.landed[i]:
            bucket.landed[i] = True
            bucket.remaining -= 1
            if not bucket.remaining:
                self._start_ready()

    def _start_ready(self) -> None:
        """Start every full bucket from the first not started on, in layout order (the same on every rank)."""
        while self.next_start < len(self.buckets) and not self.buckets[self.next_start].remaining:
            self.buckets[self.next_start].start(self.mesh, self.mesh_dim, self.launcher)
            self.next_start += 1

    def _flush(self) -> None:
        """The end of a backward: start the buckets still waiting (unused parameters' zeros included), deliver."""
        self.flush_queued = False
        if not self.armed:  # no forward armed this backward and no hooked gradient landed: arm now
            self.arm()
        for bucket in self.buckets:
            if not bucket.hooked:
                bucket.collect()
        if not any(any(bucket.landed) for bucket in self.buckets):
            return  # no gradient landed (torch.autograd.grad of other tensors): the buckets stay armed, unsent
        for bucket in self.buckets[self.next_start:]:
            bucket.start(self.mesh, self.mesh_dim, self.launcher)
        self.next_start, self.armed = len(self.buckets), False
        if self.recording is not None:  # complete (every gradient landed, once): rebuilt in it when it may
            recorded, self.recording = self.recording, None
            if len(recorded) == len(self.leaves) == len({id(p) for p in recorded}):
                self.landing_order = recorded
        for bucket in self.buckets:
            bucket.deliver()

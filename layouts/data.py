"""Data parallelism as a layout: ``replicate`` (torch's name for composable DDP).

This file owns two things:

    replicate(module, mesh, dp_mesh_dim="dp")   parameters and buffers Replicate on the dp mesh dim (lifted
                                                from mesh["tp"] when tensor parallelism placed them first);
                                                every parameter's gradient reduced once, after its accumulation
    sync_gradients(module)                      the same reduction, called explicitly (when hooks are off)

Why reduce in a hook: with the batch Shard(0) on dp and the parameters Replicate on dp, each gradient comes
out of backward Partial(sum) on dp. Left Partial, every optimizer op that reads it (AdamW's lerp_, addcmul_,
...) would plan its own all-reduce of the same gradient: hidden collectives. Each gradient is reduced to its
parameter's placements once, in buckets (``GradientBucket``, built on dtensor_plus/buckets.py): one all-reduce
on dp per bucket (the first of each backward up to 1 MiB, the others up to ``bucket_cap_mb``, 25 MiB, as DDP's),
started asynchronously as soon as it fills, so it travels while backward computes the earlier layers; the last
buckets start when backward ends, and every bucket is waited on then (the last moment .grad must be right): the
analytic 2(n-1)/n bytes of the gradients in few collectives.

How it composes with tensor parallelism on a (dp, tp) mesh: ``parallelize_module(model, mesh["tp"], plan)``
places parameters on the 1-D tp mesh; ``replicate(model, mesh)`` then lifts each one onto the 2-D mesh with
[Replicate() on dp] + its tp placement (``DTensor.from_local`` of the same local block: no data moves). The
inputs are DTensors on the 2-D mesh (batch Shard(0) on dp, ``shard_batch``). The tp styles' hooks were built
with mesh["tp"]; they accept inputs on the mesh it was sliced from and lay out only the tp mesh dim
(layouts/tensor.py ``_style_mesh_dim``), so dp placements pass through them untouched.

Local compute (``local_compute=True``, the default): the forward runs on each rank's rows with the dp mesh dim
dropped (layouts/data_local.py), each parameter through a local leaf sharing its block whose gradient lands in
place in a view of its bucket's flat buffer (layouts/data_flat.py), and an element-wise optimizer steps the parameters
on their blocks (layouts/local_step.py): DDP's work per step, with the same layouts at rest and the same exact
loss. What stays beyond DDP's: the loss and its backward run on DTensors (about ten dispatched ops), and a mean
loss all-reduces its global count (4 bytes) in forward: a second point per step where ranks wait for each other.

Example::

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], plan)
    replicate(model, mesh)
    loss = model.loss(shard_batch(tokens, mesh), shard_batch(targets, mesh))
    loss.backward()   # gradients arrive reduced: Replicate on dp
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from dtensor_plus import whole_batch
from dtensor_plus.api import distribute_tensor
from dtensor_plus.buckets import BackwardBuckets, all_reduce_flat
from dtensor_plus.dtensor import DTensor
from dtensor_plus.placements import Partial, Replicate, Shard, chunk_bounds
from dtensor_plus.placement_tuples import replicated
from dtensor_plus.redistribute import redistribute_together
from dtensor_plus.renamed import renamed_keywords
from dtensor_plus.shared_parameters import assign, parameter_slots
from dtensor_plus.spec import DTensorSpec, TensorMeta

from . import local_step
from .data_flat import FlatGradients, deposit
from .data_local import LocalCompute

__all__ = ["replicate", "GradientBucket", "reduce_grad_in_backward", "reduce_gradients", "sync_gradients", "shard_batch"]


@renamed_keywords(dp_dim="dp_mesh_dim")
def replicate(module: nn.Module, device_mesh, dp_mesh_dim: str = "dp", *, reduce_in_backward: bool = True,
              local_compute: bool = True, bucket_cap_mb: float = 25, all_reduce_launcher=None) -> nn.Module:
    """Lay ``module`` out for data parallelism on ``device_mesh``'s ``dp_mesh_dim``.

    Args:
        module: changed in place. Its parameters are plain tensors (replicated from the mesh's first rank) or
            DTensors on a sub-mesh of ``device_mesh`` without ``dp_mesh_dim`` (e.g. mesh["tp"], from
            ``parallelize_module``); they become DTensors on ``device_mesh``, Replicate on ``dp_mesh_dim``.
        device_mesh: the whole mesh, e.g. ("dp",) or ("dp", "tp").
        dp_mesh_dim: the name of the data-parallel mesh dim.
        reduce_in_backward: reduce each gradient to its parameter's placements in a post-accumulate-grad
            hook; when False, call ``sync_gradients(module)`` after backward (e.g. once after accumulating
            several micro-batches).
        local_compute: run the module's forward on each rank's rows, without DTensor dispatch on the dp mesh
            dim (layouts/data_local.py: DDP's speed; outputs come back Shard(0) on dp, exact for the global
            batch), and an element-wise optimizer (AdamW...) step its parameters on their local blocks
            (layouts/local_step.py). A forward or step that cannot be exact that way takes the DTensor path by
            itself; False: always.
        bucket_cap_mb: gradients per all-reduce, in MiB (DDP's ``bucket_cap_mb``); the first bucket of each
            backward closes at 1 MiB at most, so its all-reduce starts early.
        all_reduce_launcher: who starts the sum all-reduce of a flat gradient bucket (local compute's flat
            buckets, and the DTensor path's, e.g. of a module holding a MoE): a callable
            ``launcher(buffer, mesh, mesh_dim)`` returning an object whose ``wait()`` gives the summed tensor, issuing collectives in the same order on every rank (Lina's scheduler,
            layouts/moe_priority.py, puts the MoE's all-to-alls first); None: ``collectives.all_reduce``, async.

    Returns:
        ``module``.
    """
    if not device_mesh.mesh_dim_names or dp_mesh_dim not in device_mesh.mesh_dim_names:
        raise ValueError(f"mesh {device_mesh} has no mesh dim named {dp_mesh_dim!r}; name it, e.g. "
                         f"mesh_dim_names=('dp', 'tp')")
    if bucket_cap_mb <= 0:
        raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
    bucket = GradientBucket(int(bucket_cap_mb * 2**20), launcher=all_reduce_launcher)
    for param, slots in parameter_slots(module):
        lifted = nn.Parameter(_lift(param.detach(), device_mesh, dp_mesh_dim), requires_grad=param.requires_grad)
        if local_compute:
            lifted.__dict__[local_step.TAG] = True  # an element-wise optimizer steps it on its block
        assign(slots, lifted)  # a Parameter shared by several modules (tied weights) stays one: one gradient, one hook
        if reduce_in_backward and lifted.requires_grad:
            reduce_grad_in_backward(lifted, bucket)
    for submodule in module.modules():
        for key, buffer in list(submodule._buffers.items()):
            if buffer is not None:
                submodule._buffers[key] = _lift(buffer, device_mesh, dp_mesh_dim)
    if local_compute:
        local_step.install()
        gradients = bucket if reduce_in_backward else None  # else ZeRO's or sync_gradients' hooks want Partial .grad
        LocalCompute(device_mesh, device_mesh.mesh_dim_names.index(dp_mesh_dim), gradients).install(module)
    return module


class GradientBucket:
    """Gradients waiting to be reduced to their parameters' layouts, reduced together (DDP's buckets).

    Three ways in, all post-accumulate-grad hooks: ``add`` for a DTensor parameter whose gradient arrived on it
    (the DTensor path), and for a parameter whose forward ran on a local leaf (layouts/data_local.py: the leaf's
    gradient is this rank's rows' contribution) ``leaf_hook``'s: a plain leaf (1-D dp mesh) lands in place in
    a flat bucket of its own (layouts/data_flat.py: DDP's gradient-as-bucket-view), a DTensor leaf on the
    sub-mesh (dp x tp) is handed to ``add_local``. For the first and the last: a
    gradient that needs one all-reduce on one mesh dim (data parallelism's case) joins a bucket of its (mesh,
    mesh dim, reduce op, dtype) (``BackwardBuckets``); a full bucket starts one asynchronous all-reduce of its
    flat buffer at once, so the reduction overlaps the rest of the backward, as DDP's do. As in DDP the first
    bucket is small (``first_cap_bytes``, 1 MiB): the last layers' gradients, ready first, start moving while
    the rest of backward runs. When backward ends the last buckets start, all are awaited in order and the
    gradients written to ``.grad`` (added to a gradient already there: accumulation over several backwards);
    other moves (several mesh dims) run then, together (``reduce_gradients``). Hooks fire in the same order on
    every rank, so the buckets agree.
    """

    def __init__(self, cap_bytes: int = 25 * 2**20, first_cap_bytes: int | None = 2**20, launcher=None):  # DDP's caps
        self.cap_bytes, self.first_cap_bytes, self.launcher = cap_bytes, first_cap_bytes, launcher
        self.buckets = BackwardBuckets(cap_bytes, self._start, self._finish, first_cap_bytes=first_cap_bytes)
        self.flat: FlatGradients | None = None  # the plain local leaves' buckets, made with the first one
        self.in_flight: list = []  # (params, whether from local leaves, the pending flat all-reduce)
        self.other: list = []  # params whose gradients need another move than one all-reduce

    def add(self, param: nn.Parameter) -> None:
        grad = param.grad
        if not isinstance(grad, DTensor) or tuple(grad.placements) == tuple(param.placements):
            return
        key = _single_reduction(grad, param)  # None: kept for the end of backward (no bytes: never fills a bucket)
        self.buckets.add(key, param, 0 if key is None else grad._local_tensor.numel() * grad.element_size())

    def leaf_hook(self, param: nn.Parameter, leaf: torch.Tensor, k: int):
        """The post-accumulate-grad hook to register on ``param``'s local leaf ``leaf`` (``k`` the dp mesh dim), or
        None. A DTensor leaf (on the sub-mesh of the other mesh dims) hands its gradient to ``add_local``; a plain
        leaf (a 1-D dp mesh) lands its gradient in place in a flat bucket (layouts/data_flat.py), whose own hooks
        the buckets register themselves: None then."""
        if isinstance(leaf, DTensor):
            return lambda leaf: self.add_local(param, leaf, k)
        if self.flat is None:
            self.flat = FlatGradients(param._spec.mesh, k, self.cap_bytes, self.first_cap_bytes, self.launcher)
        return self.flat.hook(param, leaf)

    def arm(self) -> None:
        """Before a backward (replicate's forward pre-hook): the plain leaves' gradients land in their buckets."""
        if self.flat is not None:
            self.flat.arm()

    def add_local(self, param: nn.Parameter, leaf: torch.Tensor, k: int) -> None:
        """``leaf``'s gradient (``param``'s local leaf; ``k`` the dp mesh dim) joins a bucket. The leaf's .grad
        is taken: the next backward starts from none, as ``param.grad`` accumulates the reduced gradients."""
        grad, leaf.grad = leaf.grad, None
        local = grad._local_tensor if isinstance(grad, DTensor) else grad
        if isinstance(grad, DTensor) and grad._spec.placements != _without(param._spec.placements, k):
            # Partial on another mesh dim too (a norm's weight under sequence parallelism): that move, at the end
            placements = list(grad._spec.placements)
            placements.insert(k, Partial())
            self.buckets.add(None, (param, DTensor(local, param._spec.with_placements(tuple(placements)))), 0)
            return
        key = (param._spec.mesh, k, "sum", local.dtype, True)
        self.buckets.add(key, (param, local), local.numel() * local.element_size())

    def flush(self) -> None:
        """Reduce every gradient still waiting (runs by itself when backward ends)."""
        self.buckets.flush()

    def _start(self, key, items) -> None:
        if key is None:  # parameters (the DTensor path) or (parameter, Partial gradient) pairs (local leaves)
            self.other += items
            return
        mesh, mesh_dim, reduce_op, _, local = key
        grads = [g for _, g in items] if local else [p.grad._local_tensor for p in items]
        params = [p for p, _ in items] if local else items
        if self.launcher is not None and reduce_op == "sum":  # one flat buffer through the caller's launcher (Lina)
            pending = _SplitBack(self.launcher(torch.cat([g.reshape(-1) for g in grads]), mesh, mesh_dim), grads)
        else:
            pending = all_reduce_flat(grads, mesh, [(mesh_dim, reduce_op)], async_op=True)
        self.in_flight.append((params, local, pending))

    def _finish(self) -> None:
        in_flight, other, self.in_flight, self.other = self.in_flight, self.other, [], []
        for params, local, pending in in_flight:
            for param, grad in zip(params, pending.wait()):
                if local:
                    deposit(param, grad)
                else:
                    param.grad = DTensor(grad, param.grad._spec.with_placements(param.placements))
        if other:
            from_leaves = [item for item in other if isinstance(item, tuple)]
            reduce_gradients([p for p in other if not isinstance(p, tuple)])
            if from_leaves:
                grads = redistribute_together([g for _, g in from_leaves], [p.placements for p, _ in from_leaves])
                for (param, _), grad in zip(from_leaves, grads):
                    deposit(param, grad)


class _SplitBack:
    """A launched all-reduce of one bucket's gradients flattened into one buffer (a bucket holds one dtype);
    ``wait()`` gives them back in their shapes, as ``all_reduce_flat``'s pending result does."""

    def __init__(self, pending, grads):
        self.pending, self.shapes = pending, [g.shape for g in grads]

    def wait(self) -> list[torch.Tensor]:
        pieces = self.pending.wait().split([shape.numel() for shape in self.shapes])
        return [piece.view(shape) for piece, shape in zip(pieces, self.shapes)]


def _without(placements, k: int) -> tuple:
    return placements[:k] + placements[k + 1 :]


def _single_reduction(grad: DTensor, param: DTensor):
    """(mesh, mesh dim, reduce op, dtype, False) when ``grad`` differs from its parameter's layout only by being
    Partial where the parameter is Replicate, on exactly one mesh dim of more than one rank; else None."""
    diff = [k for k, (g, p) in enumerate(zip(grad.placements, param.placements)) if g != p]
    if len(diff) != 1:
        return None
    k = diff[0]
    g, p = grad.placements[k], param.placements[k]
    if not (g.is_partial() and p.is_replicate()) or grad.device_mesh.size(k) == 1:
        return None
    return grad.device_mesh, k, g.reduce_op, grad.dtype, False  # False: the gradient is on the parameter


def reduce_grad_in_backward(params, bucket: GradientBucket | None = None) -> GradientBucket:
    """Once each parameter's gradient is accumulated, reduce it to the parameter's own placements (bucketed),
    so no Partial gradient reaches an optimizer, whose every op would reduce it again."""
    bucket = bucket or GradientBucket()
    for param in [params] if isinstance(params, torch.Tensor) else params:
        param.register_post_accumulate_grad_hook(bucket.add)
    return bucket


def reduce_gradients(params) -> None:
    """Reduce the gradients of ``params`` to their parameters' placements now, together."""
    params = [p for p in params if isinstance(p.grad, DTensor) and tuple(p.grad.placements) != tuple(p.placements)]
    locals_ = redistribute_together([p.grad for p in params], [p.placements for p in params])
    for param, local in zip(params, locals_):
        param.grad = DTensor(local, param.grad._spec.with_placements(param.placements))


def sync_gradients(module: nn.Module) -> None:
    """Reduce every gradient to its parameter's placements: one all-reduce on dp per bucket of Partial gradients."""
    reduce_gradients(list(module.parameters()))


@renamed_keywords(dp_dim="dp_mesh_dim")
def shard_batch(batch: torch.Tensor, device_mesh, dp_mesh_dim: str = "dp") -> DTensor:
    """``batch`` (the same whole tensor on every rank) as a DTensor: Shard(0) on ``dp_mesh_dim``, Replicate
    elsewhere. An integer batch (targets, token ids) also keeps the whole on its DTensor (``whole_batch``): a mean
    loss over it then counts the kept targets on each rank instead of all-reducing the count."""
    coordinate = device_mesh.get_coordinate()
    if (isinstance(batch, DTensor) or not isinstance(batch, torch.Tensor) or not batch.ndim or batch.is_meta
            or coordinate is None or batch.device.type != "cpu" or device_mesh.device_type != "cpu"):
        # distribute_tensor's checks, errors and device moves (to the mesh's current device)
        placements = [Shard(0) if name == dp_mesh_dim else Replicate() for name in device_mesh.mesh_dim_names]
        out = distribute_tensor(batch, device_mesh, placements, src_data_rank=None)
        if isinstance(batch, torch.Tensor) and not isinstance(batch, DTensor) and _keeps_whole(batch, out):
            whole_batch.remember(out, batch.detach())
        return out
    # Fast path, once per batch: this rank's rows cut here (distribute_tensor's checks and redistribution cost
    # as much as a small model's loss); the same rows, spec and own storage as distribute_tensor's.
    whole = batch.detach().contiguous()
    spec, start, length = _batch_layout(device_mesh, dp_mesh_dim, TensorMeta.of(whole))
    out = DTensor(whole.narrow(0, start, length).clone(), spec, requires_grad=batch.requires_grad)
    if _keeps_whole(batch, out):
        whole_batch.remember(out, whole)
    return out


@functools.lru_cache(maxsize=64)
def _batch_layout(device_mesh, dp_mesh_dim: str, meta: TensorMeta) -> tuple[DTensorSpec, int, int]:
    """shard_batch's spec and this rank's rows (start, length) for a batch of ``meta``. Memoised: a loader gives
    the same shape every step, and one spec object for it keeps the first op's dispatch key identical (equal
    keys are compared field by field, the same object is not)."""
    names = device_mesh.mesh_dim_names
    placements = tuple(Shard(0) if name == dp_mesh_dim else Replicate() for name in names)
    start, length = 0, meta.shape[0]
    if dp_mesh_dim in names:
        k = names.index(dp_mesh_dim)
        start, length = chunk_bounds(meta.shape[0], device_mesh.size(k), device_mesh.get_coordinate()[k])
    return DTensorSpec(device_mesh, placements, meta), start, length


def _keeps_whole(batch: torch.Tensor, out: DTensor) -> bool:
    """Keep the whole batch on ``out``? Integer batches (what a loss counts), on the device of ``out``'s block."""
    return not (batch.is_floating_point() or batch.is_complex()) and batch.device == out._local_tensor.device


def _lift(t: torch.Tensor, device_mesh, dp_mesh_dim: str) -> DTensor:
    """``t`` on ``device_mesh``: Replicate on ``dp_mesh_dim``; a DTensor keeps its placements on its own mesh dims."""
    names = device_mesh.mesh_dim_names
    if not isinstance(t, DTensor):
        # src_data_rank=None: every rank built the same tensor (same seed), as DDP assumes after its broadcast.
        return distribute_tensor(t, device_mesh, replicated(device_mesh.ndim), src_data_rank=None)
    if t.device_mesh == device_mesh:
        if not isinstance(t.placements[names.index(dp_mesh_dim)], Replicate):
            raise ValueError(f"a parameter is already {t.placements} on {device_mesh}; replicate needs Replicate "
                             f"on {dp_mesh_dim!r}")
        return t
    sub_names = t.device_mesh.mesh_dim_names or ()
    # By value, not by the slice's root: equal meshes are interchangeable (a cached plan may hand back an equal
    # mesh object sliced from another root).
    if dp_mesh_dim in sub_names or not set(sub_names) <= set(names) or device_mesh[tuple(sub_names)] != t.device_mesh:
        raise ValueError(
            f"cannot lift a DTensor on {t.device_mesh} onto {device_mesh}: it must live on a sub-mesh of it "
            f"without {dp_mesh_dim!r} (e.g. mesh['tp'] from parallelize_module)"
        )
    by_name = dict(zip(sub_names, t.placements))
    placements = [by_name.get(name, Replicate()) for name in names]
    # The local block is already this rank's block in the lifted layout: Replicate on dp adds no data. The
    # global shape is passed, never rebuilt from the block: 97 rows on tp=2 are blocks of 49 and 48.
    return DTensor.from_local(t.to_local(), device_mesh, placements, shape=t.shape, stride=t.stride())

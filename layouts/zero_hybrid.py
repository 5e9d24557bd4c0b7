"""Hierarchical sharding for ZeRO-3 (MiCS, FSDP's HYBRID_SHARD, FSDP2's HSDP): ``fully_shard(module, mesh,
mesh_dim=("replicate", "shard"))`` shards the parameters inside each group of ranks along the "shard" mesh dim
and keeps one whole copy of the model states per group, replicated along the "replicate" mesh dim.

Why: ZeRO-3 over all N ranks gathers every parameter from all N, twice a step, and reduce-scatters every gradient
over all N, so every byte of it crosses the slowest link. MiCS (Zhang et al. 2022) shards inside a "partition
group" of p ranks (one node, a fast link) and replicates across the r = N/p groups: the gathers and the
reduce-scatter stay inside the group; only the gradient's shard, 1/p of it, crosses between groups. Per step and
per rank, with B the bytes of the unit's parameters and G of their gradients (each tensor padded to p equal
pieces, as torch.chunk pads it):

    "shard" mesh dim      all-gather (p-1)/p B in forward, (p-1)/p B_saved in backward (what autograd saved),
                          reduce-scatter (p-1)/p G                                   -- the first hop
    "replicate" mesh dim  all-reduce 2 (r-1)/r G/p of the reduced shards              -- the second hop

against (N-1)/N on every collective, all of it over every link, for ZeRO-3 on all N ranks. The memory of the
model states is 1/p instead of 1/N (the price). The two hops, each one flat collective per unit and each in
flight while the backward of the units before goes on: the unit's reduce-scatter (Partial on both dims ->
Partial on "replicate", Shard on "shard") is waited for when the next unit's starts, and the all-reduce of its
output on "replicate" is then started and waited for one unit later (or when backward ends), so one
reduce-scatter and one all-reduce are in flight at a time (zero_schedule.py). ``overlap=False``: both in one
``redistribute_together`` move, waited for in place.

Gradient accumulation, MiCS's two-hop synchronization: ``set_requires_all_reduce(model, False)`` before the
microbatches whose gradients only accumulate (FSDP2's method of that name): their reduce-scatters land on the
shards still Partial on "replicate" (each group's sum) and accumulate there; the first backward with it True
again all-reduces the accumulated shards once, so the inter-group bytes are paid once per optimizer step, not
once per microbatch. A step on Partial gradients is still exact (the optimizer's DTensor ops reduce them), only
slower: sync before stepping.

The API follows FSDP2, whose ``fully_shard(module, mesh=2-D mesh)`` is HSDP with mesh dim 0 replicating and 1
sharding: here the mesh may carry other dims (tp on a third), so the pair is named, outer first. The batch is
sharded on both (``[Shard(0), Shard(0)]``, plus Replicate on tp). The forward takes the DTensor path (local
compute drops one mesh dim only, zero_local.py): exact, slower per op. Not done: MiCS's hierarchical all-gather
for a partition group spanning nodes (its shard dim split again into an intra- and an inter-node hop).

    mesh = dtp.init_device_mesh("cpu", (2, 4), mesh_dim_names=("replicate", "shard"))
    for block in model.blocks:
        fully_shard(block, mesh, mesh_dim=("replicate", "shard"))
    fully_shard(model, mesh, mesh_dim=("replicate", "shard"))
    loss = loss_fn(model(distribute_tensor(x, mesh, [Shard(0), Shard(0)])), y)
"""

from __future__ import annotations

from torch import nn

from dtensor_plus.buckets import all_reduce_flat
from dtensor_plus.dtensor import DTensor
from dtensor_plus.placements import Partial, Replicate

from .zero_placement import dp_mesh_dim_index, with_placement

__all__ = ["zero_mesh_dims", "gradient_placements", "after_landing", "start_replica_sync", "ReplicaSync",
           "set_requires_all_reduce"]


def zero_mesh_dims(mesh, mesh_dim) -> tuple[int | None, int]:
    """(the replicate mesh dim or None, the shard mesh dim) of ``fully_shard``'s ``mesh_dim``: a pair (replicate,
    shard) is HSDP, anything else plain ZeRO-3's dp mesh dim."""
    if not isinstance(mesh_dim, (tuple, list)):
        return None, dp_mesh_dim_index(mesh, mesh_dim)
    if len(mesh_dim) != 2:
        raise ValueError(f"mesh_dim={mesh_dim!r}: HSDP takes two mesh dims, (replicate, shard), e.g. "
                         f"('replicate', 'shard'); one mesh dim (or None on a 1-D mesh) for plain ZeRO-3")
    replicate, shard = (dp_mesh_dim_index(mesh, d) for d in mesh_dim)
    if replicate == shard:
        raise ValueError(f"mesh_dim={mesh_dim!r} names one mesh dim twice; HSDP replicates on one mesh dim and "
                         f"shards on another, e.g. ('replicate', 'shard') on a 2-D mesh")
    return replicate, shard


def _partial_on_replicas(unit, grad) -> bool:
    return isinstance(grad, DTensor) and grad.placements[unit.replicate_mesh_dim].is_partial()


def gradient_placements(unit, shard: DTensor) -> tuple:
    """Where the unit's reduce-scatter leaves ``shard``'s gradient: Partial on the replicate mesh dim (the first
    hop; ``start_replica_sync`` then starts the second, asynchronously with overlap on), or, with overlap off and
    nothing accumulated Partial, on the shard's placements (both hops in one move, waited for in place)."""
    if unit.replicate_mesh_dim is None:
        return shard.placements
    fused = not unit.overlap and unit.requires_all_reduce
    if fused and not any(_partial_on_replicas(unit, s.grad) for _, _, s in unit.entries):
        return shard.placements
    return with_placement(shard.placements, unit.replicate_mesh_dim, Partial())


def after_landing(unit) -> None:
    """The unit's reduce-scatter has landed: start the second hop (in flight on the schedule with overlap on,
    waited for here with it off); with nothing to all-reduce the gradients are final now: an OverlappedStep
    (offload.py) may step them."""
    sync = start_replica_sync(unit)
    if sync is None:
        if unit.stepper is not None:
            unit.stepper.landed(unit)
    elif unit.overlap:
        unit.schedule.syncing.append(sync)
    else:
        sync.wait()


def start_replica_sync(unit):
    """The second hop, once the unit's gradients have landed: one flat all-reduce (per dtype) across the
    replicate mesh dim of every shard gradient still Partial there, left in flight: a ``ReplicaSync`` whose
    ``wait()`` puts the sums in ``.grad``. None when there is nothing to do (``requires_all_reduce`` off, or
    no replicate mesh dim)."""
    if unit.replicate_mesh_dim is None or not unit.requires_all_reduce:
        return None
    groups: dict = {}  # (dtype, reduce op) -> shards: one flat buffer each
    for _, _, s in unit.entries:
        if _partial_on_replicas(unit, s.grad):
            groups.setdefault((s.grad.dtype, s.grad.placements[unit.replicate_mesh_dim].reduce_op), []).append(s)
    if not groups:
        return None
    reductions = {key: [(unit.replicate_mesh_dim, key[1])] for key in groups}
    pending = [(shards, all_reduce_flat([s.grad._local_tensor for s in shards], unit.mesh, reductions[key],
                                        async_op=True)) for key, shards in groups.items()]
    return ReplicaSync(unit, pending)


class ReplicaSync:
    """HSDP's second hop in flight for one unit (``start_replica_sync``)."""

    def __init__(self, unit, pending):
        self.unit, self.pending = unit, pending

    def wait(self) -> None:
        """The all-reduced shards into ``.grad``; then the unit's gradients are final (an OverlappedStep starts)."""
        r = self.unit.replicate_mesh_dim
        for shards, pending in self.pending:
            for shard, local in zip(shards, pending.wait()):
                shard.grad = DTensor(local, shard.grad._spec.with_placements(
                    with_placement(shard.grad.placements, r, Replicate())))
        if self.unit.stepper is not None:
            self.unit.stepper.landed(self.unit)


def set_requires_all_reduce(module: nn.Module, requires_all_reduce: bool) -> None:
    """Whether the next backwards finish HSDP's gradients across the replicate mesh dim (default True), for
    every ``fully_shard`` unit in ``module``'s tree. False for the microbatches before the last of a gradient
    accumulation: they accumulate each group's sums, the next backward with True all-reduces them once."""
    units = [m._zero_state for m in module.modules() if hasattr(m, "_zero_state")]
    if not units:
        raise ValueError(f"set_requires_all_reduce: no fully_shard module in {type(module).__name__}'s tree; call "
                         f"fully_shard(..., mesh_dim=('replicate', 'shard')) first")
    if not any(u.replicate_mesh_dim is not None for u in units):
        raise ValueError("set_requires_all_reduce: the fully_shard modules here shard on one mesh dim (no replicate "
                         "mesh dim to skip); it applies to HSDP, fully_shard(..., mesh_dim=('replicate', 'shard'))")
    for unit in units:
        unit.requires_all_reduce = bool(requires_all_reduce)

"""ZeRO-3 under ``torch.compile``: each unit's gather as DTensor front doors the compiler traces through.

Why not the eager hooks: they run our own autograd Function, async collectives, saved-tensor hooks that re-gather
in backward and Python bookkeeping of prefetches in flight; Dynamo cannot trace DTensors built inside them
(``DTensor.__new__`` is a graph break) and the saved-tensor hooks would have to run inside the compiled backward.
Under compilation the scheduling is the compiler's job anyway (SimpleFSDP's approach: express the gathers in the
program, let the compiler place and overlap them).

So while Dynamo traces, a unit's pre-hook binds to each module ``shard.redistribute(placements=Replicate on
dp)`` (cast to ``mp_policy.param_dtype`` first, as eager gathers it): ``redistribute`` is a ``nonstrict_trace``
front door (tracing.py), so Dynamo records one call per parameter and AOTAutograd traces it into one functional
all-gather; its backward is the reduce-scatter (Partial on dp -> Shard) onto the shard, so the gradients are the
eager ones. The module's ops then run on the DTensor path (zero_local.py steps aside under compile). The
post-hook unbinds them. Nothing else of the eager machinery runs: no prefetch, no re-gather, no reduce-scatter in
flight, no timeline.

Memory: AOTAutograd's partitioner decides what the compiled forward saves for backward. A gathered weight that an
op saves (a matmul's) is kept from forward to backward (eager frees it and re-gathers); within a unit's forward
nothing else changes. That is the one departure from eager ZeRO-3's memory bound, listed in docs/architecture.md.
"""

from __future__ import annotations

from dtensor_plus.placements import Replicate

from .zero_placement import with_placement

__all__ = ["bind_compiled", "unbind_compiled"]


def bind_compiled(unit, args, kwargs):
    """Bind every entry's gathered whole (a traced redistribute) to its slots; the inputs cast as eager casts."""
    for i, (_, _, shard) in enumerate(unit.entries):
        source = shard
        if unit.param_dtype is not None and shard.is_floating_point():
            source = shard.to(unit.param_dtype)  # as eager: the all-gather moves param_dtype bytes
        whole = source.redistribute(placements=with_placement(shard.placements, unit.mesh_dim, Replicate()))
        for owner, name in unit.slots(i):
            owner.__dict__[name] = whole
    return args, kwargs


def unbind_compiled(unit) -> None:
    for i in range(len(unit.entries)):
        for owner, name in unit.slots(i):
            owner.__dict__.pop(name, None)

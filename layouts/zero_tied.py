"""ZeRO-3's tied weights: a Parameter several ``fully_shard`` modules hold belongs to the innermost call whose
module holds all of them (FSDP's lowest common ancestor), as one entry of one unit (zero_stage3.py).

An inner call shards such a Parameter first (through the slot it sees); a later call on an enclosing module
finds it already sharded and takes it over here. A call on a module that does not enclose the inner owner
cannot take it over: that raises, naming both holders.
"""

from __future__ import annotations

from torch import nn

from dtensor_plus.shared_parameters import assign

from .zero_local import SHARDED_FOR

__all__ = ["adopt"]


def adopt(unit, shard: nn.Parameter, slots, module: nn.Module) -> None:
    """``shard``, which an inner fully_shard call owns, is also held by ``slots`` outside that call's module: this
    call's module holds both, so ``unit`` (this call's) owns it and binds it to every slot."""
    here = " and ".join(f"{type(module).__name__}'s {slot.name}" for slot in slots)
    owners = [m._zero_state for m in module.modules() if hasattr(m, "_zero_state")]
    found = [(inner, i) for inner in owners for i, (_, _, s) in enumerate(inner.entries) if s is shard]
    if not found:
        raise ValueError(
            f"{here} is the Parameter {shard.__dict__[SHARDED_FOR]} holds, which fully_shard on a module outside "
            f"this one already shards (tied weights, or an enclosing module sharded first); one Parameter belongs to "
            f"one fully_shard call: shard inner modules first, and a Parameter several modules share on a module "
            f"holding all of them (their common ancestor, e.g. the root), not on one holder alone"
        )
    inner, index = found[0]
    inner_slots = inner.slots(index)
    names = {id(m): name for name, m in module.named_modules()}  # the inner unit's slots, named from here
    there = " and ".join(f"{names[id(m)]}.{key}".lstrip(".") for m, key in inner_slots)
    if _policy(inner) != _policy(unit):
        raise ValueError(
            f"{here} and {there} are one shared Parameter (tied weights), sharded by two fully_shard calls with "
            f"different meshes, mesh dims or policies; pass the same mesh, mesh_dim, mp_policy and offload to both"
        )
    del inner.entries[index]
    inner.tied_slots.pop(id(shard), None)
    assign(slots, shard)
    # A module reachable from both (one Linear in two places) brings the inner unit's own slot again.
    unit.add(shard, list(dict.fromkeys([*inner_slots, *((slot.owner, slot.key) for slot in slots)])))


def _policy(unit) -> tuple:
    return (unit.mesh, unit.mesh_dim, unit.replicate_mesh_dim, unit.param_dtype, unit.reduce_dtype, unit.offload)

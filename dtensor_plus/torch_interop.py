"""Code moves to dtensor_plus from ``torch.distributed.tensor`` by an import change; what it still passes of
torch's own is converted here or refused with the exact import to change.

PyTorch's placement objects (``Shard(0)``, ``Replicate()``, ``Partial("sum")`` from
``torch.distributed.tensor``) mean the same as ours, so they are converted where placements enter
(``spec.normalize_placements``). A torch ``DeviceMesh`` is not: its process groups are not ours and our
collectives, counters and timeouts would not see them, so it is refused with the fix. Recognised by the
module the class comes from, without importing torch's DTensor stack (the library never does).
"""

from __future__ import annotations

from .placements import Partial, Placement, Replicate, Shard

__all__ = ["placement_from_torch", "is_torch_placement", "check_mesh_is_ours"]

_TORCH_PLACEMENT_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")
_TORCH_MESH_MODULES = ("torch.distributed.device_mesh", "torch.distributed._device_mesh")


def _from_torch(value, modules) -> bool:
    # Ours and the sequences placements arrive in are never torch's: answered without reading a class's module
    # name, which torch.compile cannot trace for a builtin type (a graph break in every traced distribute_tensor).
    if isinstance(value, (Placement, tuple, list)):
        return False
    return type(value).__module__.startswith(modules)


def is_torch_placement(value) -> bool:
    return _from_torch(value, _TORCH_PLACEMENT_MODULES)


def placement_from_torch(value) -> Placement | None:
    """Our placement equal to torch's placement ``value``; None when ``value`` is not one of torch's."""
    if not _from_torch(value, _TORCH_PLACEMENT_MODULES):
        return None
    kind = type(value).__name__
    if kind == "Shard":
        return Shard(value.dim)
    if kind == "Replicate":
        return Replicate()
    if kind in ("Partial", "_Partial"):
        return Partial(getattr(value, "reduce_op", "sum"))
    raise TypeError(
        f"{value!r} is torch.distributed.tensor's {kind}, which has no dtensor_plus equivalent to convert to; "
        f"use dtensor_plus's placements (from dtensor_plus import Shard, Replicate, Partial)"
    )


def check_mesh_is_ours(mesh) -> None:
    if _from_torch(mesh, _TORCH_MESH_MODULES):
        raise TypeError(
            f"{mesh!r} is torch.distributed's DeviceMesh; dtensor_plus needs its own, which carries our process "
            f"groups, timeouts and counters: change `from torch.distributed.device_mesh import init_device_mesh` "
            f"to `from dtensor_plus import init_device_mesh` (same arguments)"
        )

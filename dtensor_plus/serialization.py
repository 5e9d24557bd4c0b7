"""``torch.save`` and ``torch.load(weights_only=True)`` of DTensors (and of state dicts holding them), on one mesh.

A DTensor pickles as this rank's block plus plain data: the mesh's device type, ranks and mesh dim names, its
placements as tuples of names and ints, and the global shape, stride and dtype. Only ``rebuild_dtensor`` is
added to torch's weights-only allow-list, so a file can make the loader build nothing but a DTensor, and it
checks every field. Loading finds the mesh by its layout among the meshes this process has built (a mesh holds
process groups: it is never rebuilt behind the caller's back, since that is collective) and raises, naming it,
when there is none. Each rank saves and loads its own block: moving to another mesh or world size is
``dtensor_plus.checkpoint``'s job (sharded files, resharding on load).
"""

from __future__ import annotations

import torch

from .mesh import live_mesh
from .placement_fields import from_fields, to_fields
from .spec import DTensorSpec, TensorMeta

__all__ = ["saved_fields", "checked_parts"]


def saved_fields(dtensor) -> tuple:
    """What ``DTensor.__reduce_ex__`` saves: the block and plain metadata (no mesh, no process group)."""
    spec = dtensor._spec
    mesh = spec.mesh
    return (
        dtensor._local_tensor, mesh.device_type, mesh.mesh.tolist(), mesh.mesh_dim_names,
        tuple(to_fields(p) for p in spec.placements), tuple(spec.shape), tuple(spec.tensor_meta.stride), spec.dtype,
        dtensor.requires_grad,
    )


def checked_parts(local, device_type, ranks, mesh_dim_names, placements, shape, stride, dtype, requires_grad):
    """(block, spec, requires_grad) of what ``saved_fields`` saved, on the live mesh of the same layout, every
    field checked (ValueError when there is no such mesh or the block does not fit)."""
    if not isinstance(local, torch.Tensor) or not isinstance(dtype, torch.dtype) or not isinstance(shape, (tuple, list)):
        raise ValueError(f"torch.load: a saved DTensor has a malformed block, dtype or shape "
                         f"({type(local).__name__}, {dtype!r}, {shape!r})")
    mesh = live_mesh(device_type, ranks, mesh_dim_names)
    if mesh is None:
        raise ValueError(
            f"torch.load: this DTensor was saved on DeviceMesh({device_type!r}, {ranks}, mesh_dim_names="
            f"{mesh_dim_names}), and this process has no such mesh; build it first (init_device_mesh with the same "
            f"shape and names, and slice it as before), or save and load with dtensor_plus.checkpoint, which "
            f"reshards onto any mesh and world size"
        )
    placements = tuple(from_fields(p, len(shape), "torch.load of a saved DTensor") for p in placements)
    spec = DTensorSpec(mesh, placements, TensorMeta(torch.Size(shape), tuple(stride), dtype))
    expected = spec.local_shape_and_offset()[0] if mesh.get_coordinate() is not None else tuple(local.shape)
    if tuple(local.shape) != tuple(expected) or local.dtype != dtype:
        raise ValueError(
            f"torch.load: rank {mesh.get_rank()}'s saved block is {tuple(local.shape)} {local.dtype}, but "
            f"{list(placements)} of a {tuple(shape)} {dtype} tensor on {mesh} give it {tuple(expected)}; load each "
            f"rank's own file on the mesh it was saved on, or use dtensor_plus.checkpoint to reshard"
        )
    return local, spec, bool(requires_grad)

"""Putting tensors and modules on a mesh: ``distribute_tensor`` and ``distribute_module``."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from . import collectives
from .dtensor import DTensor
from .mesh import mesh_or_current
from .placement_tuples import replicated, without_partial
from .placements import Placement, Shard
from .redistribute import redistribute_local
from .shared_parameters import SharedParameters, assign, parameter_slots
from .spec import DTensorSpec, TensorMeta, normalize_placements

__all__ = ["distribute_tensor", "distribute_module"]


def distribute_tensor(
    tensor: torch.Tensor, device_mesh=None, placements: Sequence[Placement] | None = None, *, src_data_rank: int | None = 0
) -> DTensor:
    """Split a whole tensor over a mesh; each rank keeps its block.

    Args:
        tensor: the whole tensor (on every rank; only ``src_data_rank``'s values count).
        device_mesh: the mesh (default: the one entered with ``with mesh:``).
        placements: one per mesh dim (default: all Replicate). ``Partial(op)`` holds the value at index 0 of
            that mesh dim and the identity of ``op`` elsewhere (0 for sum, 1 for product: exact, where torch
            divides a sum by n); avg, max and min hold it everywhere.
        src_data_rank: the index, on every mesh dim, of the rank whose tensor is the truth (as PyTorch's
            ``group_src`` on each mesh dim): the mesh's rank at coordinate ``(src_data_rank, ..., src_data_rank)``
            scatters and broadcasts it. It is an index within the mesh, not a global rank, so it means the same
            on every rank, on sub-meshes too. None trusts every rank to hold the same values and moves no data.
            A ``meta`` tensor moves no data either way (there is none): each rank gets its block's shape, on meta,
            to be materialised later (``module.to_empty(device=...)`` and an init).

    Example::

        w = distribute_tensor(torch.randn(16, 32), mesh, [Replicate(), Shard(1)])
    """
    if isinstance(tensor, DTensor):
        raise TypeError("distribute_tensor got a DTensor; use .redistribute(mesh, placements) to change its layout")
    device_mesh = mesh_or_current(device_mesh, "distribute_tensor")
    placements = placements if placements is not None else replicated(device_mesh.ndim)
    placements = normalize_placements(placements, device_mesh, tensor.ndim)
    if tensor.is_meta:  # a model built under torch.device("meta"): shapes only, materialised later
        device = tensor.device
    elif device_mesh.device_type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    whole = tensor.detach().to(device).contiguous()
    spec = DTensorSpec(device_mesh, placements, TensorMeta.of(whole))
    _check_src_data_rank(src_data_rank, device_mesh)  # before any membership test: every rank raises alike
    # A Partial mesh dim is distributed as Replicate, then partitioned locally (as torch does).
    whole_placements = without_partial(placements)
    if src_data_rank is not None and device_mesh.get_coordinate() is not None and not whole.is_meta:
        local = _send_blocks_from(whole.clone(), spec.with_placements(whole_placements), src_data_rank)
    else:
        everywhere = spec.with_placements(replicated(device_mesh.ndim))
        local = redistribute_local(whole, everywhere, whole_placements).clone()  # own storage, not a view
    if whole_placements != placements and device_mesh.get_coordinate() is not None:
        for mesh_dim, p in enumerate(placements):
            if p.is_partial():
                local = p.partition(local, device_mesh.size(mesh_dim), device_mesh.get_local_rank(mesh_dim))
    return DTensor(local, spec, requires_grad=tensor.requires_grad)


def _check_src_data_rank(src_data_rank, mesh) -> None:
    if src_data_rank is None:
        return
    if not isinstance(src_data_rank, int) or isinstance(src_data_rank, bool):
        raise TypeError(f"src_data_rank must be an int index within the mesh or None, got {src_data_rank!r}")
    if not 0 <= src_data_rank < min(mesh.shape):
        raise ValueError(
            f"src_data_rank={src_data_rank} is out of range for the mesh of shape {mesh.shape} ({mesh.mesh.tolist()}): "
            f"it is the source's index on every mesh dim (as in PyTorch), not a global rank, so it must be in "
            f"[0, {min(mesh.shape)}); pass 0 for the mesh's first rank ({mesh.mesh.flatten()[0].item()}), or None "
            f"when every rank already holds the same tensor"
        )


def _send_blocks_from(block: torch.Tensor, spec: DTensorSpec, src_index: int) -> torch.Tensor:
    """This rank's block of the tensor held by the mesh's rank at coordinate ``(src_index, ..., src_index)``: along
    each mesh dim in turn, a scatter where that dim shards and a broadcast where it replicates, from index
    ``src_index`` of the dim (PyTorch's ``group_src``). After mesh dim k every rank that agrees with the source on
    the dims after k holds its true block for dims up to k, so after the last one every rank does; each rank
    receives only its block, not the whole tensor."""
    mesh = spec.mesh
    src_coordinate = [src_index] * mesh.ndim
    for mesh_dim, placement in enumerate(spec.placements):
        if isinstance(placement, Shard):
            block = collectives.scatter(block, mesh, mesh_dim, placement.dim, src_coordinate[mesh_dim])
            continue
        collectives.broadcast(block, mesh, mesh_dim, src_coordinate[mesh_dim])
        if placement.is_strided_shard():  # strided rows: no scatter cuts them, so cut the broadcast block
            block = placement.chunk(block, mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)).contiguous()
    return block


def distribute_module(
    module: nn.Module,
    device_mesh=None,
    partition_fn: Callable[[str, nn.Module, object], None] | None = None,
    input_fn: Callable | None = None,
    output_fn: Callable | None = None,
) -> nn.Module:
    """Turn a module's parameters and buffers into DTensors and hook its inputs and outputs.

    A Parameter shared by several submodules (tied weights) stays one Parameter: the first submodule whose
    ``partition_fn`` places it decides its layout, a later one must place it alike (else ValueError naming both),
    and one left plain everywhere is replicated once (``dtensor_plus.shared_parameters``).

    Args:
        partition_fn: ``partition_fn(name, submodule, mesh)`` for every submodule, to place its parameters
            (e.g. with distribute_tensor); anything left a plain tensor is then replicated.
        input_fn: ``input_fn(module, inputs, mesh) -> inputs``, run before each forward.
        output_fn: ``output_fn(module, outputs, mesh) -> outputs``, run after each forward.
    """
    device_mesh = mesh_or_current(device_mesh, "distribute_module")
    if partition_fn is not None:
        shared = SharedParameters(module, "distribute_module", fix=_TIED_FIX)
        for name, submodule in module.named_modules():
            partition_fn(name, submodule, device_mesh)
            shared.decided(submodule, f"partition_fn on {name or 'the root'!r}")
        shared.finish()
    _replicate_plain_tensors(module, device_mesh)
    if input_fn is not None:
        module.register_forward_pre_hook(lambda mod, inputs: input_fn(mod, inputs, device_mesh))
    if output_fn is not None:
        module.register_forward_hook(lambda mod, inputs, outputs: output_fn(mod, outputs, device_mesh))
    return module


_TIED_FIX = (
    "make partition_fn place it the same way wherever it meets it (or place it in one submodule only and "
    "leave it alone in the others), or untie the weights"
)


def _replicate_plain_tensors(module: nn.Module, mesh) -> None:
    """Every plain parameter and buffer under ``module`` becomes Replicate, each tensor once (tied ones stay one)."""
    replicate = replicated(mesh.ndim)
    for param, slots in parameter_slots(module):
        if not isinstance(param, DTensor):
            dt = distribute_tensor(param.detach(), mesh, replicate, src_data_rank=None)
            param = nn.Parameter(dt, requires_grad=param.requires_grad)
        assign(slots, param)  # also a slot still holding what a layout placed through another slot
    placed: dict[int, DTensor] = {}  # id(plain buffer) -> its DTensor: a buffer shared by modules stays one
    for submodule in module.modules():
        for key, buffer in list(submodule._buffers.items()):
            if buffer is not None and not isinstance(buffer, DTensor):
                if id(buffer) not in placed:
                    placed[id(buffer)] = distribute_tensor(buffer, mesh, replicate, src_data_rank=None)
                submodule._buffers[key] = placed[id(buffer)]

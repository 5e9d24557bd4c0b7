"""Putting tensors and modules on a mesh: ``distribute_tensor`` and ``distribute_module``."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from . import collectives
from .dtensor import DTensor
from .placements import Placement, Replicate, Shard
from .redistribute import redistribute_local
from .spec import DTensorSpec, TensorMeta, normalize_placements

__all__ = ["distribute_tensor", "distribute_module"]


def distribute_tensor(
    tensor: torch.Tensor, device_mesh, placements: Sequence[Placement] | None = None, *, src_data_rank: int | None = 0
) -> DTensor:
    """Split a whole tensor over a mesh; each rank keeps its block.

    Args:
        tensor: the whole tensor (on every rank; only ``src_data_rank``'s values count).
        device_mesh: the mesh.
        placements: one per mesh dim, Shard or Replicate (default: all Replicate).
        src_data_rank: global rank whose tensor is the truth, broadcast to the others; None trusts every rank
            to hold the same values and moves no data.

    Example::

        w = distribute_tensor(torch.randn(16, 32), mesh, [Replicate(), Shard(1)])
    """
    if isinstance(tensor, DTensor):
        raise TypeError("distribute_tensor got a DTensor; use .redistribute(mesh, placements) to change its layout")
    placements = placements if placements is not None else [Replicate()] * device_mesh.ndim
    placements = normalize_placements(placements, device_mesh, tensor.ndim)
    for p in placements:
        if p.is_partial():
            raise ValueError(
                f"distribute_tensor cannot create {p!r}: a whole tensor is not a partial sum; distribute it as "
                f"Replicate() and redistribute, or build Partial blocks with DTensor.from_local"
            )
    device = torch.device(device_mesh.device_type, torch.cuda.current_device()) if device_mesh.device_type == "cuda" else torch.device("cpu")
    whole = tensor.detach().to(device).contiguous()
    spec = DTensorSpec(device_mesh, placements, TensorMeta.of(whole))
    if src_data_rank is not None and device_mesh.get_coordinate() is not None:
        local = _send_blocks_from(whole.clone(), spec, src_data_rank)
    else:
        replicated = spec.with_placements([Replicate()] * device_mesh.ndim)
        local = redistribute_local(whole, replicated, placements).clone()  # own storage, not a view
    return DTensor(local, spec, requires_grad=tensor.requires_grad)


def _send_blocks_from(block: torch.Tensor, spec: DTensorSpec, src_rank: int) -> torch.Tensor:
    """This rank's block of ``src_rank``'s tensor: along each mesh dim in turn, a scatter where that dim shards
    and a broadcast where it replicates. After mesh dim k every rank that agrees with the source on the dims
    after k holds its true block for dims up to k, so after the last one every rank does; each rank receives
    only its block, not the whole tensor."""
    mesh = spec.mesh
    where = (mesh.mesh == src_rank).nonzero()
    if len(where) == 0:
        raise ValueError(f"src_data_rank={src_rank} is not in the mesh {mesh.mesh.tolist()}")
    src_coordinate = where[0].tolist()
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
    device_mesh,
    partition_fn: Callable[[str, nn.Module, object], None] | None = None,
    input_fn: Callable | None = None,
    output_fn: Callable | None = None,
) -> nn.Module:
    """Turn a module's parameters and buffers into DTensors and hook its inputs and outputs.

    Args:
        partition_fn: ``partition_fn(name, submodule, mesh)`` for every submodule, to place its parameters
            (e.g. with distribute_tensor); anything left a plain tensor is then replicated.
        input_fn: ``input_fn(module, inputs, mesh) -> inputs``, run before each forward.
        output_fn: ``output_fn(module, outputs, mesh) -> outputs``, run after each forward.
    """
    for name, submodule in module.named_modules():
        if partition_fn is not None:
            partition_fn(name, submodule, device_mesh)
        _replicate_plain_tensors(submodule, device_mesh)
    if input_fn is not None:
        module.register_forward_pre_hook(lambda mod, inputs: input_fn(mod, inputs, device_mesh))
    if output_fn is not None:
        module.register_forward_hook(lambda mod, inputs, outputs: output_fn(mod, outputs, device_mesh))
    return module


def _replicate_plain_tensors(module: nn.Module, mesh) -> None:
    replicate = [Replicate()] * mesh.ndim
    for key, param in list(module._parameters.items()):
        if param is not None and not isinstance(param, DTensor):
            dt = distribute_tensor(param.detach(), mesh, replicate, src_data_rank=None)
            module._parameters[key] = nn.Parameter(dt, requires_grad=param.requires_grad)
    for key, buffer in list(module._buffers.items()):
        if buffer is not None and not isinstance(buffer, DTensor):
            module._buffers[key] = distribute_tensor(buffer, mesh, replicate, src_data_rank=None)

"""Where ZeRO keeps things on the dp mesh dim: the shared helpers of ``fully_shard`` (zero_stage3.py) and
``ZeroRedundancyOptimizer`` (zero_optimizer.py): which mesh dim is dp, which tensor dim dp shards, and on
which device the shards live (``CPUOffload``).

    k = dp_mesh_dim_index(mesh, "dp")
    shard = param.redistribute(placements=with_placement(param.placements, k, zero_placement(param, k)))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dtensor_plus.dtensor import DTensor
from dtensor_plus.placements import Replicate, Shard
from dtensor_plus.placement_tuples import replicated

__all__ = ["CPUOffload", "dp_mesh_dim_index", "with_placement", "to_dtensor", "check_dp_placement",
           "zero_placement", "compute_device", "on_device"]


@dataclass(frozen=True)
class CPUOffload:
    """Keep ZeRO's shards (and so the optimizer's state and step) in host memory; they are copied to the mesh's
    device for each collective and the gradients back (FSDP2's ``CPUOffloadPolicy``). pin_memory: page-locked
    host copies, so the host-device copies can run asynchronously (accelerators only)."""

    pin_memory: bool = True


def compute_device(mesh) -> torch.device:
    """The device the mesh computes and communicates on (this rank's current accelerator)."""
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def on_device(t: DTensor, device, pin_memory: bool = False) -> DTensor:
    """``t`` with its local tensor on ``device`` (the same DTensor when it is there already: no copy)."""
    local = t._local_tensor
    if local.device == torch.device(device):
        return t
    moved = local.to(device)
    if pin_memory and moved.device.type == "cpu" and torch.cuda.is_available():
        moved = moved.pin_memory()
    return DTensor(moved, t._spec, requires_grad=t.requires_grad)


def dp_mesh_dim_index(mesh, mesh_dim) -> int:
    """The index of the data-parallel mesh dim given as ``mesh_dim`` (a name, an index, or None on a 1-D mesh)."""
    if mesh_dim is None:
        if mesh.ndim != 1:
            raise ValueError(f"ZeRO on a {mesh.ndim}-D mesh {mesh} needs mesh_dim='dp' (the data-parallel mesh dim) "
                             f"(fully_shard also takes a pair, mesh_dim=('replicate', 'shard'): HSDP)")
        return 0
    if isinstance(mesh_dim, str):
        names = [mesh.mesh_dim_name(k) for k in range(mesh.ndim)]
        if mesh_dim not in names:
            raise ValueError(f"mesh_dim={mesh_dim!r} is not one of the mesh dims {names}")
        return names.index(mesh_dim)
    if not 0 <= mesh_dim < mesh.ndim:
        raise ValueError(f"mesh_dim={mesh_dim} is out of range for a {mesh.ndim}-D mesh")
    return mesh_dim


def with_placement(placements, mesh_dim: int, placement) -> tuple:
    return tuple(placement if k == mesh_dim else p for k, p in enumerate(placements))


def to_dtensor(param: torch.Tensor, mesh) -> DTensor:
    """A parameter as a DTensor on ``mesh``: a plain tensor becomes Replicate (every rank holds the same
    values, as after the usual same-seed init; no data moves)."""
    if isinstance(param, DTensor):
        if param.device_mesh != mesh:
            raise ValueError(f"parameter lives on {param.device_mesh}, but ZeRO was given {mesh}")
        return param.detach()
    return DTensor.from_local(param.detach(), mesh, replicated(mesh.ndim))


def check_dp_placement(param: DTensor, mesh_dim: int, who: str) -> None:
    got = param.placements[mesh_dim]
    if got != Replicate():
        raise ValueError(
            f"{who}: parameter of shape {tuple(param.shape)} is {got!r} on the dp mesh dim; ZeRO starts from "
            f"Replicate() there (place the other mesh dims first, e.g. tensor parallelism on 'tp')"
        )


def zero_placement(param: DTensor, mesh_dim: int):
    """Where ZeRO keeps ``param`` on the dp mesh dim: Shard(d) on its first tensor dim that no other mesh dim
    shards. Why not always Shard(0): placements nest in mesh-dim order, so dp Shard(0) over a tp Shard(0)
    would split the whole rows first and tp's blocks would stop being the blocks tp computes with; gathering
    dp alone could then not restore them (PyTorch's _StridedShard case). On another dim the dp all-gather
    restores exactly the tp layout. A tensor with no free dim (a 0-d one, or a 1-D tp-sharded bias) stays
    Replicate on dp; its gradient is then all-reduced (2(n-1)/n x its bytes) instead of reduce-scattered."""
    taken = {  # a StridedShard (a packed qkv weight's tp layout) takes its dim too
        p.normalized(param.ndim).dim if isinstance(p, Shard) else p.dim
        for k, p in enumerate(param.placements) if k != mesh_dim and (isinstance(p, Shard) or p.is_strided_shard())
    }
    free = [d for d in range(param.ndim) if d not in taken]
    return Shard(free[0]) if free else Replicate()

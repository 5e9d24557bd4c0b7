"""Dynamic sequence parallelism (DSP, Zhao et al. 2024): switch which sequence-like dim is sharded between
the stages of a model with several of them (time and space in a video transformer).

A stage that attends along time needs whole time series, so it runs with space sharded on the sp mesh dim;
the next stage, attending along space, runs with time sharded. Between them the sharded dim switches, and
``Shard(a) -> Shard(b)`` on one mesh dim is one all-to-all in the redistribution planner: each rank sends
(n-1)/n of its block, M (n-1) / n^2 bytes for an activation of M bytes (the paper's M/N per switch, exactly
so when n divides both dims; torch.chunk-uneven dims travel padded to the largest block). Its backward is
the mirror all-to-all. Nothing here communicates: the redistribution does, counted by ``comm_mode``.

Two ways in: ``switch_sequence_dim(x, dim)`` in code, or the style ``SequenceSwitch(dim)`` on a stage's
module, which moves its DTensor inputs (whatever dim they arrive sharded on) to ``Shard(dim)``::

    mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("sp",))
    x = distribute_tensor(video_BTSC, mesh, [Shard(2)])          # space sharded
    parallelize_module(model, mesh, {"blocks.*.temporal": SequenceSwitch(2),     # attend along time
                                     "blocks.*.spatial": SequenceSwitch(1)})     # attend along space
"""

from __future__ import annotations

from torch import nn

from dtensor_plus.dtensor import DTensor
from dtensor_plus.placements import Shard

from .tensor import ParallelStyle, _style_mesh_dim

__all__ = ["switch_sequence_dim", "SequenceSwitch"]


def switch_sequence_dim(x: DTensor, dim: int, mesh_dim: int | str = 0) -> DTensor:
    """``x`` sharded on tensor dim ``dim`` along ``mesh_dim`` in place of the dim it is sharded on there:
    one all-to-all (none if already there). Every other mesh dim keeps its placement."""
    if not isinstance(x, DTensor):
        raise TypeError(f"switch_sequence_dim takes a DTensor, got {type(x).__name__}; distribute it first")
    index = x.device_mesh.mesh_dim_index(mesh_dim)
    dim = dim + x.ndim if dim < 0 else dim
    if not 0 <= dim < x.ndim:
        raise ValueError(f"switch_sequence_dim(dim={dim}) on a {x.ndim}-d tensor")
    current = x.placements[index]
    if not current.is_shard():
        raise ValueError(f"switch_sequence_dim: the tensor is {current} on mesh dim {mesh_dim!r}, not sharded on a "
                         f"sequence dim; place it Shard(seq dim) there first (distribute_tensor or redistribute)")
    if current.is_shard(dim):
        return x
    taken = [k for k, p in enumerate(x.placements) if k != index and p.is_shard(dim)]
    if taken:
        raise ValueError(f"switch_sequence_dim: dim {dim} is already sharded on mesh dim {taken[0]} "
                         f"({list(x.placements)}); a sequence switch moves one mesh dim onto an unsharded dim")
    placements = tuple(Shard(dim) if k == index else p for k, p in enumerate(x.placements))
    return x.redistribute(placements=placements)


class SequenceSwitch(ParallelStyle):
    """A stage that computes along every dim but ``dim``: its DTensor positional inputs are moved to
    ``Shard(dim)`` on the style's (1-D) mesh before it runs (``switch_sequence_dim``); plain inputs, and
    inputs already there, pass unchanged."""

    def __init__(self, dim: int):
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise TypeError(f"SequenceSwitch(dim={dim!r}) takes the tensor dim to shard, an int")
        self.dim = dim

    def apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if device_mesh.ndim != 1:
            raise ValueError(f"SequenceSwitch needs a 1-D mesh (the sequence-parallel one), got {device_mesh}; "
                             f"pass e.g. mesh['sp']")

        def hook(_, args):
            return tuple(switch_sequence_dim(a, self.dim, _style_mesh_dim(a, device_mesh)) if isinstance(a, DTensor)
                         else a for a in args)

        module.register_forward_pre_hook(hook)
        return module

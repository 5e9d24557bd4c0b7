"""One rank of a world of any size, in this process: torch's fake process group and tensors on the meta device.

Inside ``simulated_world(world_size, rank)`` every dtensor_plus program runs as rank ``rank`` of ``world_size``:
``init_device_mesh`` builds its meshes over the fake backend (its collectives move nothing and cost nothing, but
``collectives.py`` counts them as usual, from the shapes), and every tensor lives on the meta device (shapes and
dtypes, no storage), so a model far larger than this machine's memory runs its forward and backward.

How tensors stay meta: ``MetaLocalOps`` (meta_ops.py) puts every factory and every copy a program asks for on the
cpu on the meta device instead (``torch.zeros(n)``, ``t.to("cpu")``, ``t.cpu()``) and moves a plain cpu tensor
meeting meta ones there too. The program's own device stays "cpu": meshes say cpu, layouts compare devices to
the mesh's. Values are what cannot be simulated: a step that reads a tensor's value (``.item()``, ``.tolist()``,
a data-dependent branch) raises, and the error says so.
"""

from __future__ import annotations

import contextlib

import torch.distributed as dist

from ..dispatcher import DISPATCHER
from .meta_ops import MetaLocalOps

__all__ = ["simulated_world", "SimulatedWorld"]


class SimulatedWorld:
    """What ``simulated_world`` yields: the world's size, this rank, and the mode that keeps tensors meta
    (``step.simulate_step`` reads its FLOP counts)."""

    def __init__(self, world_size: int, rank: int, mode: MetaLocalOps):
        self.world_size, self.rank, self.mode = world_size, rank, mode

    def __repr__(self) -> str:
        return f"SimulatedWorld(rank {self.rank} of {self.world_size})"


@contextlib.contextmanager
def simulated_world(world_size: int, rank: int = 0):
    """Run the block as rank ``rank`` of a ``world_size``-rank world on the fake backend, tensors on meta.

    Example (a 1024-rank world, rank 5)::

        with simulated_world(1024, rank=5) as world:
            mesh = init_device_mesh("cpu", (128, 8), mesh_dim_names=("dp", "tp"))
            ...                                  # build and place the model as on the real cluster
            result = simulate_step(world, step, models=[model], optimizers=[opt])
    """
    _check_world(world_size, rank)
    # torch registers its fake backend ("fake": every collective a no-op) when this test-kit module is imported
    import torch.testing._internal.distributed.fake_pg  # noqa: F401

    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world_size)
    try:
        with MetaLocalOps() as mode:
            yield SimulatedWorld(world_size, rank, mode)
    finally:
        _forget_fake_groups()
        dist.destroy_process_group()


def _check_world(world_size, rank) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"simulated_world needs world_size, a positive int, got {world_size!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ValueError(f"simulated_world needs a rank in [0, {world_size}), got {rank!r}")
    if dist.is_initialized():
        raise RuntimeError(
            f"simulated_world({world_size}, rank={rank}) starts its own (fake) default process group, but this "
            f"process already runs one ({dist.get_backend()!r}); simulate in a process without torch.distributed "
            f"started (a fresh python, or after torch.distributed.destroy_process_group())"
        )


def _forget_fake_groups() -> None:
    # The mesh module caches groups and meshes across calls; the fake ones die with this world.
    for key in [k for k in DISPATCHER.process_groups if k[0] == "fake"]:
        del DISPATCHER.process_groups[key]
    for key, mesh in list(DISPATCHER.live_meshes.items()):
        if mesh.backend == "fake":
            del DISPATCHER.live_meshes[key]
    DISPATCHER.world_timeout[:] = []

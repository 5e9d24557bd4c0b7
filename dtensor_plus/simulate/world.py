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

import torch
from types import MappingProxyType
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from .. import collectives, plain_tensors
from .. import call_plan as _plan
from ..dispatcher import DISPATCHER
from .meta_ops import MetaLocalOps, MovesStayPut, SimulationValueError

__all__ = ["simulated_world", "SimulatedWorld", "Wire", "current_world"]


class SimulatedWorld:
    """What ``simulated_world`` yields: the world's size, this rank, the mode that keeps tensors meta
    (``step.simulate_step`` reads its FLOP counts), and what the world assumes where a real one reads values
    other ranks hold (``expert_counts``, ``tie_holders``, ``wire``). ``current_world()`` finds it from a layout."""

    def __init__(self, world_size: int, rank: int, mode: MetaLocalOps, *, expert_load="balanced",
                 pipeline_ties=None, wire=None):
        self.world_size, self.rank, self.mode = world_size, rank, mode
        self.expert_load, self.wire = expert_load, wire
        self.pipeline_ties = None if pipeline_ties is None else MappingProxyType(
            {key: tuple(pp) for key, pp in pipeline_ties.items()})
        mode.world = self

    def __repr__(self) -> str:
        return f"SimulatedWorld(rank {self.rank} of {self.world_size})"

    def expert_counts(self, source: int, sources: int, assignments: int, num_experts: int) -> list[int]:
        """How many of the ``assignments`` (token, slot) pairs that ep rank ``source`` of ``sources`` routes go to
        each expert: the world's assumption, since routing follows the router's values. "balanced": as evenly
        as possible (the first ``assignments % num_experts`` experts one more), the load a trained router's
        balancing loss aims at; a callable ``expert_load(source, sources, assignments, num_experts)`` says it
        itself (a measured load, a skewed one). Every ep rank is assumed to route as many assignments as this
        one (an even batch split)."""
        if self.expert_load == "balanced":
            q, r = divmod(assignments, num_experts)
            return [q + (e < r) for e in range(num_experts)]
        counts = [int(c) for c in self.expert_load(source, sources, assignments, num_experts)]
        if len(counts) != num_experts or sum(counts) != assignments or min(counts) < 0:
            raise ValueError(f"simulated_world's expert_load({source}, {sources}, {assignments}, {num_experts}) gave "
                             f"{counts}: it must give {num_experts} non-negative counts summing to {assignments}")
        return counts

    def tie_holders(self, key: str) -> tuple[int, ...]:
        """The pp indices of the stages holding the weight tied across stages as ``key`` (``pipeline_ties``):
        every rank's declarations are exchanged when a real schedule is built, which a simulated rank cannot."""
        if self.pipeline_ties is None or key not in self.pipeline_ties:
            raise SimulationValueError(
                f"this pipeline rank holds a weight tied across stages ({key!r}); which pp ranks hold it is known "
                f"on a real world by exchanging every rank's declarations. Tell the simulated world: "
                f"simulated_world(..., pipeline_ties={{{key!r}: [pp indices of the stages holding it]}})")
        return self.pipeline_ties[key]


class Wire:
    """What the simulated ranks of one world tell each other when simulated one after another (pass one ``Wire``
    to each ``simulated_world``): a pipeline stage's header (the spec of the activation it sends, which the
    next stage needs to shape its receive buffers) is posted when the sender is simulated and read when the
    receiver is. Data moves nowhere: only what a receiver must know to run."""

    def __init__(self):
        self._posted: dict[tuple[int, int], object] = {}

    def post(self, receiver: int, tag: int, message) -> None:
        self._posted[receiver, tag] = message

    def read(self, receiver: int, tag: int, sender: int):
        if (receiver, tag) not in self._posted:
            raise SimulationValueError(
                f"rank {receiver} receives a pipeline header (the spec of the activation rank {sender} sends) that no "
                f"simulated rank posted: simulate rank {sender} first, in a simulated_world(..., wire=w) with the same "
                f"Wire w, then rank {receiver}")
        return self._posted[receiver, tag]


def current_world() -> SimulatedWorld | None:
    """The simulated world this code runs in (a layout asks where a real world would read other ranks' values),
    None on a real world."""
    for mode in _get_current_dispatch_mode_stack():
        if isinstance(mode, MetaLocalOps):
            return mode.world
    return None


@contextlib.contextmanager
def simulated_world(world_size: int, rank: int = 0, *, expert_load="balanced", pipeline_ties=None,
                    wire: Wire | None = None):
    """Run the block as rank ``rank`` of a ``world_size``-rank world on the fake backend, tensors on meta.

    Where a real rank reads values other ranks hold, the simulated one assumes them, as stated here:

    * ``expert_load``: how tokens route to experts (mixture of experts: the all-to-all split sizes follow the
      router's values). "balanced" (each ep rank sends each expert an equal share of its assignments) or a
      callable; see ``SimulatedWorld.expert_counts``. ``tests/simulate`` checks it exactly against real ranks
      whose router is forced to the same routing.
    * ``pipeline_ties``: ``{key: pp indices}`` for weights tied across pipeline stages held by this rank.
    * ``wire``: a ``Wire`` shared by the simulations of a pipeline's ranks, simulated in pp order (each stage
      learns its input's spec from the header the previous stage posted).

    Example (a 1024-rank world, rank 5)::

        with simulated_world(1024, rank=5) as world:
            mesh = init_device_mesh("cpu", (128, 8), mesh_dim_names=("dp", "tp"))
            ...                                  # build and place the model as on the real cluster
            result = simulate_step(world, step, models=[model], optimizers=[opt])
    """
    _check_world(world_size, rank)
    # torch registers its fake backend ("fake": every collective a no-op) when this test-kit module is imported
    import torch.testing._internal.distributed.fake_pg  # noqa: F401

    devices = dist.Backend.backend_capability["fake"]
    if "meta" not in devices:  # point-to-point calls look their backend up by the tensors' device: meta blocks
        devices.append("meta")

    DISPATCHER.clear_plans()  # plans cached in a real world hold its meshes and groups
    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world_size)
    try:
        with _plain_tensors_assumed_same(), _dtensors_on_program_device(), MovesStayPut(), MetaLocalOps() as mode:
            yield SimulatedWorld(world_size, rank, mode, expert_load=expert_load, pipeline_ties=pipeline_ties,
                                 wire=wire)
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


@contextlib.contextmanager
def _plain_tensors_assumed_same():
    """A plain tensor joining DTensors is checked equal on every rank by an all-gather of its digest
    (plain_tensors.py). A simulated world has no values to digest and no other ranks to differ: the same
    all-gather is issued (so it is counted as on the real world), the ranks taken to agree."""
    original = plain_tensors._raise_unless_same

    def same_by_assumption(func, plain, mesh):
        digest = torch.zeros(2 * len(plain), dtype=torch.int64)  # two crc32 values per tensor, as _digest makes
        collectives.every_rank_rows(digest, mesh)

    plain_tensors._raise_unless_same = same_by_assumption
    try:
        yield
    finally:
        plain_tensors._raise_unless_same = original


@contextlib.contextmanager
def _dtensors_on_program_device():
    """A DTensor whose block is meta reports the cpu, the device the program placed it on: torch picks kernels of
    composite ops by the outer tensor's device (SDPA takes its cpu flash kernel, which the context-parallel
    rules shard; on meta it would decompose to matmuls), and layouts compare devices with the mesh's."""
    original = torch.Tensor._make_wrapper_subclass
    cpu, meta = torch.device("cpu"), torch.device("meta")

    def on_program_device(cls, *args, device=None, **kwargs):
        if device is not None and torch.device(device) == meta:
            device = cpu
        return original(cls, *args, device=device, **kwargs)

    torch.Tensor._make_wrapper_subclass = on_program_device
    _plan._make_wrapper_subclass = on_program_device
    try:
        yield
    finally:
        torch.Tensor._make_wrapper_subclass = original
        _plan._make_wrapper_subclass = original


def _forget_fake_groups() -> None:
    # The mesh module caches groups and meshes across calls; the fake ones die with this world. Cached plans
    # hold meshes (a later world's equal mesh would find a plan on this one's dead groups): dropped too.
    DISPATCHER.clear_plans()
    for key in [k for k in DISPATCHER.process_groups if k[0] == "fake"]:
        del DISPATCHER.process_groups[key]
    for key, mesh in list(DISPATCHER.live_meshes.items()):
        if mesh.backend == "fake":
            del DISPATCHER.live_meshes[key]
    DISPATCHER.world_timeout[:] = []

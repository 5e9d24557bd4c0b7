"""DeviceMesh: an N-d grid of ranks with named mesh dimensions and one process group per mesh dimension.

The mesh only describes which ranks cooperate; ``collectives.py`` is the module that talks over the groups.
The mesh is the one place that says which ranks a collective along a mesh dim runs over (``row_ranks``: this
rank's row; ``rows``: every row) and the one owner of process groups (``PROCESS_GROUPS``): a group is created once
per set of ranks and use, and reused by every mesh that needs it (slices, flattened meshes and meshes built again
in later calls all share them).

Every group a mesh uses (mesh dims, flattened meshes, the pipeline's point-to-point groups) fails a stuck
collective after ``collective_timeout()``: ``DTENSOR_PLUS_TIMEOUT_S`` when set, else the default group's own timeout
(what ``init_process_group`` was given; 300 s when ``init_device_mesh`` starts it), never torch's 30-minute default
for new groups.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from .dispatcher import DISPATCHER

__all__ = ["DeviceMesh", "init_device_mesh", "mesh_or_current", "live_mesh", "PROCESS_GROUPS"]


def _backend_for(device_type: str) -> str:
    # A simulated world (dtensor_plus.simulate) runs on torch's fake backend: its groups must be fake too.
    if dist.is_initialized() and dist.get_backend() == "fake":
        return "fake"
    return "nccl" if device_type == "cuda" else "gloo"


class ProcessGroupCache:
    """Every process group dtensor_plus creates, one per (backend, use, ranks): equal rows share one group.

    ``use`` is ``"collectives"`` (the groups ``collectives.py`` runs on; a row of the whole world is the default
    group itself) or ``"point_to_point"`` (the pipeline's sends and receives: p2p ops advance a group's sequence
    number on the two ranks involved only, so on the collectives' groups they would put ranks out of step for
    anything that compares those numbers (the test pool, the divergence checker), and on NCCL they would queue
    behind that communicator's collectives). ``new_group`` is a collective over the whole world, so ``create``
    must see the same rows in the same order on every rank; ``get`` only looks up.
    """

    USES = ("collectives", "point_to_point")

    @property
    def _groups(self) -> dict:
        return DISPATCHER.process_groups  # (backend, use, ranks) -> group

    def create(self, rows, backend: str, use: str = "collectives"):
        """A group for every row in ``rows`` (created once, reused after); returns this rank's, or None when no row
        holds it. Collective: every rank of the world calls it with the same rows in the same order."""
        if use not in self.USES:
            raise ValueError(f"process group use {use!r} is not one of {self.USES}")
        timeout, rank, mine = collective_timeout(), dist.get_rank(), None
        for row in rows:
            row = tuple(row)
            _check_ascending(row)
            key = (backend, use, row)
            if key not in self._groups:
                whole_world = use == "collectives" and row == tuple(range(dist.get_world_size()))
                self._groups[key] = dist.group.WORLD if whole_world else dist.new_group(list(row), backend=backend,
                                                                                       timeout=timeout)
            if rank in row:
                mine = self._groups[key]
                use_timeout(mine, backend, timeout)  # a cached group follows a changed DTENSOR_PLUS_TIMEOUT_S
        return mine

    def get(self, ranks, backend: str, use: str = "collectives"):
        """The group ``create`` made for exactly ``ranks``, or None."""
        return self._groups.get((backend, use, tuple(ranks)))


# The one cache of process groups (groups outlive the meshes that created them), kept on the dispatcher object.
PROCESS_GROUPS = ProcessGroupCache()  # no state of its own: the groups live on the dispatcher object


def _check_ascending(row: tuple[int, ...]) -> None:
    # torch.distributed numbers a group's members in ascending global rank, whatever order new_group is given;
    # our collectives place blocks by mesh coordinate, so a mesh dim listing its ranks out of order would get
    # every gather, scatter and ring in the wrong order. Every rank sees the same rows: all raise alike.
    if list(row) != sorted(row):
        raise ValueError(
            f"a mesh dim runs over ranks {list(row)}, not in ascending order: torch.distributed orders a group's "
            f"ranks ascending, so collectives along it would return blocks out of mesh order. Lay out the mesh "
            f"with ascending ranks along every dim (as init_device_mesh does), and flatten mesh dims in their "
            f"mesh order (mesh['dp', 'tp'].flatten(), not mesh['tp', 'dp'].flatten())"
        )


# -- timeouts ---------------------------------------------------------------------------------------------------

_DEFAULT_TIMEOUT_S = 300.0


def _env_timeout() -> timedelta | None:
    value = os.environ.get("DTENSOR_PLUS_TIMEOUT_S")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ValueError(f"DTENSOR_PLUS_TIMEOUT_S={value!r} must be a positive number of seconds, e.g. 600")
    return timedelta(seconds=seconds)


def collective_timeout() -> timedelta:
    """How long a collective on a mesh's groups may wait: ``DTENSOR_PLUS_TIMEOUT_S`` when set, else the default
    group's timeout as ``init_process_group`` set it."""
    world = dist.group.WORLD
    if not DISPATCHER.world_timeout or DISPATCHER.world_timeout[0] is not world:  # before any use_timeout can change it
        DISPATCHER.world_timeout[:] = [world, _timeout_of(world, dist.get_backend(world)) or timedelta(seconds=_DEFAULT_TIMEOUT_S)]
    return _env_timeout() or DISPATCHER.world_timeout[1]


def _timeout_of(group, backend: str) -> timedelta | None:
    try:
        return group._get_backend(torch.device("cuda" if backend == "nccl" else "cpu")).options._timeout
    except Exception:  # a backend without options (or a torch that moved them): leave the group as it is
        return None


def use_timeout(group, backend: str, timeout: timedelta) -> None:
    """Give ``group`` (which holds this rank) ``timeout``, when it has another one."""
    current = _timeout_of(group, backend)
    if current is not None and current != timeout:
        dist.distributed_c10d._set_pg_timeout(timeout, group)


class DeviceMesh:
    """An N-d grid of global ranks. Each mesh dimension has a process group along it.

    Args:
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL).
        mesh: nested list or integer tensor of global ranks; its shape is the mesh shape.
        mesh_dim_names: optional names, one per mesh dimension, for slicing (``mesh["tp"]``).

    Every rank of the default group must build the same meshes in the same order (group creation is
    collective). Example::

        mesh = DeviceMesh("cpu", [[0, 1], [2, 3]], mesh_dim_names=("dp", "tp"))
        mesh["tp"].size()  # 2
    """

    def __init__(self, device_type: str, mesh, mesh_dim_names: Sequence[str] | None = None, *, _root=None, _root_dims=None):
        with _real_tensors():  # a simulated world builds meshes under FakeTensorMode: the rank table stays real
            ranks = torch.as_tensor(mesh, dtype=torch.int64, device="cpu")
        if ranks.ndim == 0:
            raise ValueError(f"DeviceMesh needs at least one mesh dimension, got the scalar {ranks.item()}")
        if not dist.is_initialized():
            raise RuntimeError(
                "DeviceMesh needs torch.distributed initialised; use init_device_mesh(), which starts it "
                "from torchrun's environment, or call torch.distributed.init_process_group first"
            )
        world = dist.get_world_size()
        flat = ranks.flatten().tolist()
        if len(set(flat)) != len(flat) or min(flat) < 0 or max(flat) >= world:
            raise ValueError(f"mesh ranks {flat} must be distinct ranks in [0, {world}) (world size {world})")
        names = tuple(mesh_dim_names) if mesh_dim_names is not None else None
        if names is not None and (len(names) != ranks.ndim or len(set(names)) != len(names)):
            raise ValueError(f"mesh_dim_names {names} must be {ranks.ndim} distinct names, one per mesh dim")
        self.device_type = device_type
        self.backend = _backend_for(device_type)
        self.mesh = ranks
        # The same ranks as a numpy array: rows and coordinates are computed on it, since tensor ops on ``mesh``
        # would be run by a compiler's fake-tensor mode when a layout's code asks while being traced.
        self._ranks = np.array(flat, dtype=np.int64).reshape(tuple(ranks.shape))
        self.mesh_dim_names = names
        self.shape = tuple(ranks.shape)
        self.ndim = ranks.ndim
        self._rank = dist.get_rank()
        self._coordinate = self.coordinate_of(self._rank)
        # A slice remembers the mesh it came from: its rows and groups are the root's, and flattening it must
        # create groups on every rank of the root alike.
        self._root = _root if _root is not None else self
        self._root_dims = tuple(_root_dims) if _root_dims is not None else tuple(range(self.ndim))
        self._my_rows = [self._row_through_me(mesh_dim) for mesh_dim in range(self.ndim)]
        if _root is None:  # every rank creates every row's group, in the same order (a collective); a flattened
            for mesh_dim in range(self.ndim):  # mesh's one row was created by flatten on every rank already
                PROCESS_GROUPS.create(self.rows(mesh_dim), self.backend)
        self._groups = [None if row is None else PROCESS_GROUPS.get(row, self.backend) for row in self._my_rows]
        # Identity as plain Python values: comparing the rank tensors would run an aten op, which fails under a
        # compiler's fake-tensor mode (Dynamo and AOTAutograd compare meshes while tracing).
        self._key = (device_type, self.shape, tuple(flat), names)
        self._hash = hash(self._key)
        DISPATCHER.live_meshes[self._key] = self  # what torch.load finds (live_mesh)

    def _row_through_me(self, mesh_dim: int) -> tuple[int, ...] | None:
        if self._coordinate is None:
            return None
        index = tuple(slice(None) if k == mesh_dim else c for k, c in enumerate(self._coordinate))
        return tuple(self._ranks[index].tolist())

    # -- rows: the ranks a collective along a mesh dim runs over ---------------------------------------------

    def row_ranks(self, mesh_dim: int | str) -> tuple[int, ...]:
        """The global ranks a collective along ``mesh_dim`` runs over from this rank: those at this rank's
        coordinate on every other mesh dim, in mesh order (ascending, which is also their group order).
        On a (dp, tp) mesh [[0, 1], [2, 3]], rank 2's ``row_ranks("tp")`` is (2, 3) and ``row_ranks("dp")`` (0, 2)."""
        self._require_member()
        return self._my_rows[self.mesh_dim_index(mesh_dim)]

    def rows(self, *mesh_dims: int | str) -> list[tuple[int, ...]]:
        """Every row along ``mesh_dims`` over all ranks of the mesh this one was sliced from (itself, when it
        was built whole): one row per coordinate on the other mesh dims, in mesh order. Several mesh dims merge
        row-major in the order given (what ``flatten`` makes of them). A slice's rows include its siblings'
        (``mesh["tp"].rows("tp")`` is every tp row of ``mesh``): creating their groups is collective."""
        dims = [self._root_dims[self.mesh_dim_index(d)] for d in mesh_dims]
        if not dims or len(set(dims)) != len(dims):
            raise ValueError(f"rows needs distinct mesh dims, got {mesh_dims}")
        root = self._root
        others = [d for d in range(root.ndim) if d not in dims]
        length = _prod(root.shape[d] for d in dims)
        return [tuple(row) for row in root._ranks.transpose(*others, *dims).reshape(-1, length).tolist()]

    def coordinate_of(self, rank: int) -> tuple[int, ...] | None:
        """Global ``rank``'s index along every mesh dim, or None when the mesh does not hold it."""
        where = np.argwhere(self._ranks == rank)
        return tuple(where[0].tolist()) if len(where) else None

    # -- queries --------------------------------------------------------------------------------------

    def size(self, mesh_dim: int | str | None = None) -> int:
        """Number of ranks along ``mesh_dim``, or in the whole mesh."""
        return self.mesh.numel() if mesh_dim is None else self.shape[self.mesh_dim_index(mesh_dim)]

    def mesh_dim_index(self, mesh_dim: int | str) -> int:
        if isinstance(mesh_dim, str):
            if not self.mesh_dim_names or mesh_dim not in self.mesh_dim_names:
                raise ValueError(
                    f"mesh dim {mesh_dim!r} does not exist; this mesh has dims {self.mesh_dim_names}"
                )
            return self.mesh_dim_names.index(mesh_dim)
        if not -self.ndim <= mesh_dim < self.ndim:
            raise ValueError(f"mesh dim {mesh_dim} is out of range for a {self.ndim}-d mesh")
        return mesh_dim % self.ndim

    def mesh_dim_name(self, mesh_dim: int) -> str:
        return self.mesh_dim_names[mesh_dim] if self.mesh_dim_names else str(mesh_dim)

    def get_group(self, mesh_dim: int | str = 0):
        """The process group along ``mesh_dim`` that holds this rank: the one over ``row_ranks(mesh_dim)``."""
        self._require_member()
        return self._groups[self.mesh_dim_index(mesh_dim)]

    def get_coordinate(self) -> tuple[int, ...] | None:
        """This rank's index along every mesh dim, or None when the rank is not in the mesh."""
        return self._coordinate

    def get_local_rank(self, mesh_dim: int | str = 0) -> int:
        self._require_member()
        return self._coordinate[self.mesh_dim_index(mesh_dim)]

    def get_rank(self) -> int:
        return self._rank

    def _require_member(self):
        if self._coordinate is None:
            raise ValueError(f"rank {self._rank} is not in this mesh ({self.mesh.tolist()})")

    # -- slicing and flattening -----------------------------------------------------------------------

    def __getitem__(self, names: str | Sequence[str]) -> DeviceMesh:
        """The sub-mesh through this rank along the named mesh dims: ``mesh["tp"]``, ``mesh["dp", "tp"]``."""
        names = (names,) if isinstance(names, str) else tuple(names)
        dims = [self.mesh_dim_index(n) for n in names]
        if len(set(dims)) != len(dims):
            raise ValueError(f"mesh dims {names} repeat a dimension")
        self._require_member()
        index = tuple(slice(None) if d in dims else self._coordinate[d] for d in range(self.ndim))
        sub = self._ranks[index]
        order = sorted(dims)
        sub = torch.from_numpy(np.ascontiguousarray(sub.transpose(*[order.index(d) for d in dims])))
        return DeviceMesh(
            self.device_type,
            sub,
            [self.mesh_dim_name(d) for d in dims],
            _root=self._root,
            _root_dims=[self._root_dims[d] for d in dims],
        )

    def flatten(self, mesh_dim_name: str | None = None) -> DeviceMesh:
        """This mesh's dims merged into one (row-major), named ``mesh_dim_name``: ``mesh["dp", "tp"].flatten()``.

        Every rank of the root mesh must call it (it creates one group per parallel slice, collectively)."""
        name = mesh_dim_name or "_".join(self.mesh_dim_name(d) for d in range(self.ndim))
        PROCESS_GROUPS.create(self.rows(*range(self.ndim)), self.backend)
        self._require_member()
        return DeviceMesh(self.device_type, self._ranks.reshape(-1).tolist(), [name])  # this rank's row of those just created

    # -- identity -------------------------------------------------------------------------------------

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, DeviceMesh) and self._key == other._key)

    def __hash__(self) -> int:
        return self._hash

    # A mesh is a handle on process groups: copies of modules and tensors share it, and it never pickles.
    def __copy__(self) -> DeviceMesh:
        return self

    def __deepcopy__(self, memo) -> DeviceMesh:
        return self

    def __reduce__(self):
        raise TypeError(
            f"{self!r} holds process groups and cannot be pickled; send its shape and mesh_dim_names and "
            f"rebuild it with init_device_mesh on the other side"
        )

    # -- the default mesh (torch's `with mesh:`) -----------------------------------------------------------

    def __enter__(self) -> DeviceMesh:
        """``with mesh:`` makes this the mesh that distribute_tensor, from_local, the factories, distribute_module
        and parallelize_module use when their mesh argument is left out (innermost ``with`` wins), as in torch."""
        DISPATCHER.entered_meshes.append(self)
        return self

    def __exit__(self, *exc_info) -> None:
        DISPATCHER.entered_meshes.pop()

    def __fx_repr__(self) -> tuple[str, dict]:
        """How a compiled graph names this mesh: the live mesh of this layout (``live_mesh``), found again when
        the graph's code is made (torch.compile keeps meshes as constants: tracing.py)."""
        return (f"live_mesh({self.device_type!r}, {self.mesh.tolist()}, {self.mesh_dim_names!r})",
                {"live_mesh": live_mesh})

    def __repr__(self) -> str:
        names = f", mesh_dim_names={self.mesh_dim_names}" if self.mesh_dim_names else ""
        return f"DeviceMesh({self.device_type!r}, {self.mesh.tolist()}{names})"




def live_mesh(device_type: str, ranks: Sequence[Sequence[int]] | Sequence[int], mesh_dim_names) -> DeviceMesh | None:
    """A mesh of this process laid out as given (the mesh a DTensor saved with torch.save was on), or None."""
    ranks = torch.as_tensor(ranks, dtype=torch.int64)
    names = tuple(mesh_dim_names) if mesh_dim_names is not None else None
    return DISPATCHER.live_meshes.get((device_type, tuple(ranks.shape), tuple(ranks.flatten().tolist()), names))


def mesh_or_current(device_mesh: DeviceMesh | None, who: str) -> DeviceMesh:
    """``device_mesh``, or the innermost mesh entered with ``with mesh:`` when it is None."""
    if device_mesh is not None:
        return device_mesh
    if not DISPATCHER.entered_meshes:
        raise ValueError(
            f"{who} got no device_mesh and no mesh is entered; pass device_mesh=mesh, or call it inside `with mesh:`"
        )
    return DISPATCHER.entered_meshes[-1]


def init_device_mesh(
    device_type: str, mesh_shape: Sequence[int], mesh_dim_names: Sequence[str] | None = None
) -> DeviceMesh:
    """A mesh of the given shape over ranks 0..world-1 in row-major order.

    Starts torch.distributed from torchrun's environment (gloo on CPU, NCCL on CUDA) when it is not
    running yet. Example::

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    """
    mesh_shape = tuple(int(s) for s in mesh_shape)
    if not dist.is_initialized():
        _init_from_environment(device_type)
    world = dist.get_world_size()
    if any(s < 1 for s in mesh_shape) or _prod(mesh_shape) != world:
        shape = " * ".join(map(str, mesh_shape))
        raise ValueError(f"mesh shape {shape} = {_prod(mesh_shape)} != world size({world}); pick a shape whose product is {world}")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    return DeviceMesh(device_type, np.arange(world).reshape(mesh_shape).tolist(), mesh_dim_names)


def _init_from_environment(device_type: str) -> None:
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "torch.distributed is not initialised and no torchrun environment (RANK, WORLD_SIZE) is set; "
            "launch with `torchrun --nproc-per-node N script.py` or call init_process_group first"
        )
    timeout = _env_timeout() or timedelta(seconds=_DEFAULT_TIMEOUT_S)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun keeps its agent's store across restarts (--max-restarts) and torch adds no per-attempt
        # prefix, so a restarted group would read the dead attempt's gloo addresses and fail to connect
        # ("Connection refused", pytorch#167288). Each attempt gets keys of its own.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                    timeout=timeout)
        store = dist.PrefixStore(f"dtensor_plus/attempt_{attempt}", agent_store)
        dist.init_process_group(_backend_for(device_type), store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        return
    dist.init_process_group(_backend_for(device_type), timeout=timeout)


def _real_tensors():
    """No dispatch mode (a FakeTensorMode) while the mesh's own rank tensor is made."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out

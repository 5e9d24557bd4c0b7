"""Communication a rule declares: the collectives its local op needs beside the moves of its inputs.

Most rules need no communication of their own: the inputs move to the placements the rule names (the planner
picks those collectives) and the local op runs on each block alone. Some local ops must combine statistics
across ranks in the middle of their work: a norm over a sharded dim, a mean over a batch-sharded loss, a
log-softmax over sharded classes, ring attention's rotating key/value blocks, Ulysses' head/sequence swap
back. Such a rule declares what it needs in its decision, and never calls a collective itself::

    Sharding(inputs=..., outputs=..., local_op=fn, communication=(AllReduce(mesh_dims=(1,), reduce_ops=("sum",)),))

The executor then calls ``fn(*local_args, comm=comm, **local_kwargs)``: ``comm`` (a ``Communicator``) runs the
declared collectives through ``collectives.py`` (counted, attributed to the op, audited by explicit mode)
and refuses any it was not told about. Because the declaration is part of the cached decision, the cost
model and the planner see it (``cost_terms``), and a tracer can map each one onto a functional collective.
A local op may keep ``comm`` for its backward (an autograd Function's ``ctx``): the same declaration holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import collectives, point_to_point
from .redistribute import redistribute_local
from .spec import DTensorSpec

__all__ = [
    "AllReduce", "RingShift", "Redistribution", "Broadcast", "Reduce", "Communicator", "UndeclaredCommunication",
    "cost_terms",
]


@dataclass(frozen=True, slots=True)
class AllReduce:
    """All-reduce statistics over ``mesh_dims``, one after another in this order (the same on every rank).
    ``reduce_ops`` lists the all-reduces one call of the local op issues, in order ("sum", "max", "min", "avg",
    "product"; log-softmax's max then sum is ``("max", "sum")``): the local op may ask only for these, and the
    cost model counts one all-reduce per entry on each mesh dim."""

    mesh_dims: tuple[int, ...]
    reduce_ops: tuple[str, ...] = ("sum",)


@dataclass(frozen=True, slots=True)
class RingShift:
    """Pass blocks one step round the ring of ``mesh_dim`` (send to the next rank, receive from the previous),
    up to ``steps`` times per call of the local op."""

    mesh_dim: int
    steps: int


@dataclass(frozen=True, slots=True)
class Redistribution:
    """Move a block laid out as ``src`` to ``dst`` placements (the planner picks the collectives)."""

    src: DTensorSpec
    dst: tuple


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Broadcast a block along ``mesh_dim`` from the rank the local op names, up to ``steps`` times per call
    (SUMMA's panels, ops/summa.py: step p broadcasts from index p)."""

    mesh_dim: int
    steps: int


@dataclass(frozen=True, slots=True)
class Reduce:
    """Sum blocks along ``mesh_dim`` onto the rank the local op names, up to ``steps`` times per call (SUMMA's
    partial products of the transposed forms, ops/summa.py)."""

    mesh_dim: int
    steps: int


Declaration = AllReduce | RingShift | Redistribution | Broadcast | Reduce


class UndeclaredCommunication(RuntimeError):
    pass


class Communicator:
    """What a local op may communicate: exactly its rule's declarations, on the op's mesh."""

    __slots__ = ("op", "mesh", "declared", "asked_for")

    def __init__(self, op, mesh, declared: tuple, asked_for: bool = False):
        self.op, self.mesh, self.declared = op, mesh, declared
        self.asked_for = asked_for  # a layout entered by name owns the rule: explicit mode lets it run

    def describe(self) -> list[str]:
        """The declared collectives in words, for explicit mode's message: "all_reduce(max, sum) on 'tp'"."""
        words = []
        for decl in self.declared:
            if type(decl) is AllReduce:
                words += [f"all_reduce({', '.join(decl.reduce_ops)}) on {self.mesh.mesh_dim_name(k)!r}"
                          for k in decl.mesh_dims if self.mesh.size(k) > 1]
            elif type(decl) is RingShift:
                words.append(f"{decl.steps} ring shifts on {self.mesh.mesh_dim_name(decl.mesh_dim)!r}")
            elif type(decl) in (Broadcast, Reduce):
                kind = type(decl).__name__.lower()
                words.append(f"{decl.steps} {kind}s on {self.mesh.mesh_dim_name(decl.mesh_dim)!r}")
            else:
                words.append(f"a redistribution {list(decl.src.placements)} -> {list(decl.dst)}")
        return words

    def all_reduce(self, t: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        """``t`` all-reduced over the declared mesh dims in their order (a 1-rank mesh dim adds nothing)."""
        decl = self._find(AllReduce, lambda d: reduce_op in d.reduce_ops, f"all_reduce({reduce_op!r})")
        for mesh_dim in decl.mesh_dims:
            if self.mesh.size(mesh_dim) > 1:
                t = collectives.all_reduce(t, self.mesh, mesh_dim, reduce_op)
        return t

    def ring_shift(self, tensors, mesh_dim: int, **kwargs):
        """point_to_point.ring_shift over the declared ring of ``mesh_dim`` (keyword arguments as there)."""
        self._find(RingShift, lambda d: d.mesh_dim == mesh_dim, f"ring_shift(mesh_dim={mesh_dim})")
        return point_to_point.ring_shift(tensors, self.mesh, mesh_dim, **kwargs)

    def broadcast(self, t: torch.Tensor, mesh_dim: int, src_index: int) -> torch.Tensor:
        """collectives.broadcast of ``t`` (in place) along the declared ``mesh_dim`` from index ``src_index``."""
        self._find(Broadcast, lambda d: d.mesh_dim == mesh_dim, f"broadcast(mesh_dim={mesh_dim})")
        return collectives.broadcast(t, self.mesh, mesh_dim, src_index)

    def reduce(self, t: torch.Tensor, mesh_dim: int, dst_index: int) -> torch.Tensor:
        """collectives.reduce (sum) of ``t`` along the declared ``mesh_dim`` onto index ``dst_index`` (None on
        the other ranks)."""
        self._find(Reduce, lambda d: d.mesh_dim == mesh_dim, f"reduce(mesh_dim={mesh_dim})")
        return collectives.reduce(t, self.mesh, mesh_dim, dst_index, "sum")

    def redistribute(self, local: torch.Tensor, src: DTensorSpec, dst: tuple) -> torch.Tensor:
        """This rank's block of a tensor laid out as ``src``, moved to ``dst``."""
        self._find(Redistribution, lambda d: d.src == src and tuple(d.dst) == tuple(dst),
                   f"redistribute({list(src.placements)} -> {list(dst)})")
        return redistribute_local(local, src, tuple(dst))

    def _find(self, kind, matches, asked: str):
        for decl in self.declared:
            if type(decl) is kind and matches(decl):
                return decl
        raise UndeclaredCommunication(
            f"{self.op}: its local op asked for {asked}, which its rule did not declare (declared: "
            f"{list(self.declared) or 'nothing'}); add it to the rule's Sharding(communication=...)"
        )


def cost_terms(declared: tuple, mesh) -> list[tuple[str, int]]:
    """(collective, ranks taking part) for each collective the declarations may issue per call: the latency
    terms a cost model adds to the moves of the inputs (the bytes are statistics, small beside them)."""
    terms = []
    for decl in declared:
        if type(decl) is AllReduce:
            terms += [("all_reduce", mesh.size(k)) for _ in decl.reduce_ops for k in decl.mesh_dims if mesh.size(k) > 1]
        elif type(decl) is RingShift:
            terms += [("send_recv", mesh.size(decl.mesh_dim))] * decl.steps
        elif type(decl) in (Broadcast, Reduce):
            terms += [(type(decl).__name__.lower(), mesh.size(decl.mesh_dim))] * decl.steps
        else:
            terms += [("redistribute", mesh.size())]
    return terms

"""Point-to-point communication, beside collectives.py and counted the same way: the ring of one mesh dim
(ring attention's k/v blocks) and the sends and receives between pipeline stages. A ring shift involves every
rank of its mesh dim, so the divergence check runs before it as before a collective; pipeline sends involve
only the named peers and are not checked.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import PendingCollective, _named_error, _nbytes, _record, _run
from .mesh import PROCESS_GROUPS

__all__ = ["ring_shift", "p2p_group", "send_recv"]


# -- point-to-point: the ring of one mesh dim ---------------------------------------------------------------


def ring_shift(tensors, mesh, mesh_dim: int | str, *, recv_shapes=None, tag: int = 0, async_op: bool = False,
               hops: int = 1):
    """Send each tensor to the next rank along ``mesh_dim`` (local index i -> i+1 mod n) and receive, in its
    place, the one the previous rank sends: a single batch of p2p ops (``batch_isend_irecv``). ``hops``
    shifts further (i -> i+hops mod n, from i-hops; negative: backwards), the same for every rank: the
    DistFlashAttn schedule sends queries to the rank ``hops`` behind and results back.

    ``recv_shapes`` (default: the shapes sent) says what arrives; with uneven shards the previous rank's
    block can differ in size, and the caller knows it from global metadata. Empty tensors still travel (as
    empty messages): every rank issues the same p2p ops, so the group's sequence numbers stay in step.
    Tensor i travels with tag ``tag + i``, so two shifts in flight at once (ring attention's k/v and its
    gradient accumulators) never match each other's messages. Bytes: what this rank sends. With
    ``async_op`` it returns a ``PendingCollective`` whose ``wait()`` gives the received list; otherwise the
    list.
    """
    mesh_dim = mesh.mesh_dim_index(mesh_dim)  # a name or an index
    n, index = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    sends = [t.contiguous() for t in tensors]
    if n == 1:  # the ring of one: what is sent comes straight back
        return PendingCollective("ring_shift", mesh, mesh_dim, None, lambda: sends) if async_op else sends
    shapes = [t.shape for t in sends] if recv_shapes is None else [torch.Size(s) for s in recv_shapes]
    recvs = [t.new_empty(shape) for t, shape in zip(sends, shapes)]
    _record("ring_shift", mesh, mesh_dim, sum(_nbytes(t) for t in sends))
    if hops % n == 0:
        raise ValueError(f"ring_shift(hops={hops}) on a ring of {n} ranks sends every rank's blocks to itself")
    works = _run("ring_shift", mesh, mesh_dim, _batch_ring_shift, sends, recvs, (index + hops) % n, (index - hops) % n, tag)
    # under torch.compile the shift is a functional collective, done when _run returns (no works)
    pending = PendingCollective("ring_shift", mesh, mesh_dim, _AllWorks(works or []), lambda: recvs)
    return pending if async_op else pending.wait()


def _batch_ring_shift(sends, recvs, next_peer: int, prev_peer: int, tag: int, *, group):
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=next_peer, tag=tag + i) for i, t in enumerate(sends)]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=prev_peer, tag=tag + i) for i, t in enumerate(recvs)]
    return dist.batch_isend_irecv(ops) if ops else []


class _AllWorks:
    """The works of several p2p ops, waited on as one (``works``: each op's own)."""

    def __init__(self, works):
        self.works = works

    def wait(self):
        for work in self.works:
            work.wait()


# -- point-to-point: pipeline stage boundaries ---------------------------------------------------------------


def p2p_group(mesh, mesh_dim: int | str):
    """This rank's point-to-point group along ``mesh_dim`` (over ``mesh.row_ranks(mesh_dim)``), apart from the
    collectives' group over the same ranks (``ProcessGroupCache`` says why); created on first use (group creation
    is collective: every rank of the whole mesh calls this together, e.g. when building a pipeline schedule). Its
    timeout is the mesh groups' (``mesh.collective_timeout()``): a stage whose peer is stuck fails within it."""
    return PROCESS_GROUPS.create(mesh.rows(mesh_dim), mesh.backend, "point_to_point")


def send_recv(sends, recvs, mesh, mesh_dim: int | str):
    """Post point-to-point ops along ``mesh_dim`` without waiting, each as its own ``isend`` / ``irecv``.

    ``sends`` and ``recvs`` are lists of ``(tensor, peer, tag)``: ``peer`` is the other rank's local index on
    ``mesh_dim``; a received tensor is filled in place. Not a collective: only the named peers take part. The
    ops run on ``p2p_group(mesh, mesh_dim)``, which every rank must have created beforehand. Returns
    ``(send_work, recv_work)``, each with ``wait()`` (all its ops) and ``works`` (one per op, in order: a pipeline
    waits on each receive right before the action that consumes it, on its sends at the end of the step). One
    call per op rather than one ``batch_isend_irecv``: on gloo the batch costs ~0.1 ms more per call in checks.
    Counted as ``"send"`` with the bytes this rank sends.
    """
    mesh_dim = mesh.mesh_dim_index(mesh_dim)
    row = mesh.row_ranks(mesh_dim)
    group = PROCESS_GROUPS.get(row, mesh.backend, "point_to_point")
    if group is None:
        raise RuntimeError(f"no point-to-point group for ranks {list(row)}: call p2p_group(mesh, {mesh_dim!r}) on every "
                           f"rank first")
    if sends:
        _record("send", mesh, mesh_dim, sum(_nbytes(t) for t, _, _ in sends))
    try:
        send_works = [dist.isend(t, group=group, group_dst=peer, tag=tag) for t, peer, tag in sends]
        recv_works = [dist.irecv(t, group=group, group_src=peer, tag=tag) for t, peer, tag in recvs]
    except RuntimeError as error:
        raise _named_error("send_recv", mesh, mesh_dim, error, group) from error
    return _AllWorks(send_works), _AllWorks(recv_works)

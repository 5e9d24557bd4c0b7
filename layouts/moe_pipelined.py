"""Dispatch pipelined with expert compute (Tutel, PipeMoE / ScheMoE): the token all-to-all is cut into chunks so
that chunk c+1 travels to the experts' ranks, and chunk c-1 travels back, while the experts compute chunk c.

Every (peer rank, expert) group of rows is cut into ``chunks`` pieces of near-equal size (piece c of a group of
g rows: rows ``floor(g c / C)`` to ``floor(g (c+1) / C)``), so each chunk is itself a dispatch of the same
shape as the whole one: both sides derive its split sizes from the counts exchanged once up front, and each
expert sees a share of its rows in every chunk. The all-to-alls are issued with
``collectives.all_to_all_splits(..., async_op=True)`` and waited for just before their rows are needed.

Backward overlaps too. Each all-to-all is two autograd nodes, ``_Issue`` (forward: issue) and ``_Wait``
(forward: wait), joined by an empty token tensor; in backward the roles swap: ``_Wait.backward`` issues the
inverse all-to-all of the gradient and ``_Issue.backward`` waits for it. Autograd runs the ready node created
last first, so backward walks the chunks in reverse: every combine's gradient all-to-all is issued at once,
then for chunk c: wait for its gradient rows, run the experts' backward on them, issue the inverse dispatch,
and move on to chunk c-1 while that one travels. Every rank builds the same graph, so every rank issues the
collectives in the same order. Bytes: exactly those of the unchunked dispatch, in C times as many messages.
Not in a simulated world (its routing is assumed, its chunks are not modelled).

Legend: A assignments sent by this rank, R rows received, C chunks, n ep ranks, L experts per rank, D width.
"""

from __future__ import annotations

from typing import Callable

import torch

from dtensor_plus.collectives import all_to_all_splits

__all__ = ["exchange_pipelined", "chunk_pieces"]


class _Link:
    """One chunk's all-to-all between its two autograd nodes: the issued forward transfer, then the issued
    backward one (a plain object passed to both, so nothing outlives the graph)."""

    def __init__(self, mesh, mesh_dim: int, send_splits, recv_splits, priority=None):
        self.mesh, self.mesh_dim, self.send_splits, self.recv_splits = mesh, mesh_dim, send_splits, recv_splits
        self.priority = priority  # Lina's scheduler (moe_priority.py), told when a backward all-to-all arrived
        self.forward = self.backward = None


class _Issue(torch.autograd.Function):
    """forward: issue the all-to-all of ``rows``, return an empty token / backward: wait for the inverse
    all-to-all ``_Wait.backward`` issued, the gradient of ``rows``."""

    @staticmethod
    def forward(ctx, rows, link):
        ctx.link = link
        link.forward = all_to_all_splits(rows, link.mesh, link.mesh_dim, link.send_splits, link.recv_splits,
                                         async_op=True)
        return rows.new_empty(0)

    @staticmethod
    def backward(ctx, _token_grad):
        grad = ctx.link.backward.wait()
        if ctx.link.priority is not None:  # a gap before the next all-to-all: the gradient all-reduce may go
            ctx.link.priority.gap()
        return grad, None


class _Wait(torch.autograd.Function):
    """forward: wait for the issued all-to-all, the received rows / backward: issue the inverse all-to-all of
    their gradient (back to the ranks that sent the rows) and return at once; ``_Issue.backward`` waits."""

    @staticmethod
    def forward(ctx, _token, link):
        ctx.link = link
        return link.forward.wait()

    @staticmethod
    def backward(ctx, grad):
        link = ctx.link
        link.backward = all_to_all_splits(grad.contiguous(), link.mesh, link.mesh_dim, link.recv_splits,
                                          link.send_splits, async_op=True)
        return grad.new_empty(0), None


def chunk_pieces(counts: torch.Tensor, chunks: int) -> torch.Tensor:
    """(C, *counts.shape): piece c of each group of g rows, ``floor(g (c+1) / C) - floor(g c / C)``."""
    c = torch.arange(chunks + 1, device=counts.device).view(-1, *([1] * counts.ndim))
    bounds = counts.unsqueeze(0) * c // chunks
    return bounds[1:] - bounds[:-1]


def exchange_pipelined(rows_AD: torch.Tensor, counts_E: torch.Tensor, through: Callable, mesh, ep_mesh_dim: int,
                       chunks: int, priority=None) -> torch.Tensor:
    """``moe_dispatch._exchange`` in ``chunks`` pipelined pieces: the rows (grouped by expert) through their
    experts on their ranks and back, in the same order. ``through(received_RD, counts_nL)`` runs this rank's
    experts on rows received ordered by (source rank, expert), ``counts_nL`` of each, and returns them in
    that order. ``priority``: Lina's scheduler (moe_priority.AllToAllFirst), told of each gap in backward."""
    n = mesh.size(ep_mesh_dim)
    E, A = counts_E.numel(), rows_AD.shape[0]
    L = E // n
    recv_counts_nL = all_to_all_splits(counts_E, mesh, ep_mesh_dim, [L] * n, [L] * n).view(n, L)
    # the chunk of each sent row: its position within its expert's group, cut as chunk_pieces cuts the group
    expert_A = torch.repeat_interleave(torch.arange(E, device=rows_AD.device), counts_E, output_size=A)
    position_A = torch.arange(A, device=rows_AD.device) - (torch.cumsum(counts_E, 0) - counts_E)[expert_A]
    group_A = counts_E[expert_A]
    chunk_A = ((position_A + 1) * chunks + group_A - 1) // group_A - 1
    send_CE, recv_CnL = chunk_pieces(counts_E, chunks), chunk_pieces(recv_counts_nL, chunks)
    # NOTE: .tolist() is a device-to-host sync: c10d needs the split sizes on the host.
    send_splits = send_CE.view(chunks, n, L).sum(2).tolist()
    recv_splits = recv_CnL.sum(2).tolist()
    index = [torch.nonzero(chunk_A == c).flatten() for c in range(chunks)]  # stays grouped by expert
    sent = [rows_AD[i] for i in index]

    def start(c, rows, forward=True):
        splits = (send_splits[c], recv_splits[c]) if forward else (recv_splits[c], send_splits[c])
        link = _Link(mesh, ep_mesh_dim, *splits, priority)
        return _Issue.apply(rows, link), link

    dispatch, outs, combine = [start(0, sent[0])], [], []
    for c in range(chunks):
        received = _Wait.apply(*dispatch[c])
        if c + 1 < chunks:  # in flight while the experts compute chunk c
            dispatch.append(start(c + 1, sent[c + 1]))
        outs.append(through(received, recv_CnL[c]))
        combine.append(start(c, outs[c], forward=False))  # in flight while the experts compute chunk c + 1
    back = [_Wait.apply(*issued) for issued in combine]
    return torch.cat(back)[torch.argsort(torch.cat(index))]

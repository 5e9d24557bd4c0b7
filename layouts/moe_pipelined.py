"""Dispatch pipelined with expert compute (Tutel, PipeMoE / ScheMoE): the token all-to-all is cut into chunks so
that chunk c+1 travels to the experts' ranks, and chunk c-1 travels back, while the experts compute chunk c.

Every (peer rank, expert) group of rows is cut into ``chunks`` pieces of near-equal size (piece c of a group of
g rows: rows ``floor(g c / C)`` to ``floor(g (c+1) / C)``), so each chunk is itself a dispatch of the same
shape as the whole one: both sides derive its split sizes from the counts exchanged once up front, and each
expert sees a share of its rows in every chunk. The all-to-alls are issued with
``collectives.all_to_all_splits(..., async_op=True)`` and waited for just before their rows are needed.

Forward overlaps; backward does not: each chunk's backward runs the inverse all-to-all synchronously (autograd
runs one node at a time), as the unchunked dispatch does. Bytes: exactly those of the unchunked dispatch, in
C times as many messages. Not in a simulated world (its routing is assumed, its chunks are not modelled).

Legend: A assignments sent by this rank, R rows received, C chunks, n ep ranks, L experts per rank, D width.
"""

from __future__ import annotations

from typing import Callable

import torch

from dtensor_plus.collectives import all_to_all_splits

__all__ = ["exchange_pipelined", "chunk_pieces"]


class _Arrived(torch.autograd.Function):
    """forward: the rows of an issued all-to-all of ``sent`` (waits for it) / backward: the inverse all-to-all
    of the gradient, back to the ranks that sent the rows."""

    @staticmethod
    def forward(ctx, sent, pending, mesh, mesh_dim, send_splits, recv_splits):
        ctx.mesh, ctx.mesh_dim, ctx.send_splits, ctx.recv_splits = mesh, mesh_dim, send_splits, recv_splits
        return pending.wait()

    @staticmethod
    def backward(ctx, grad):
        back = all_to_all_splits(grad.contiguous(), ctx.mesh, ctx.mesh_dim, ctx.recv_splits, ctx.send_splits)
        return back, None, None, None, None, None


def chunk_pieces(counts: torch.Tensor, chunks: int) -> torch.Tensor:
    """(C, *counts.shape): piece c of each group of g rows, ``floor(g (c+1) / C) - floor(g c / C)``."""
    c = torch.arange(chunks + 1, device=counts.device).view(-1, *([1] * counts.ndim))
    bounds = counts.unsqueeze(0) * c // chunks
    return bounds[1:] - bounds[:-1]


def exchange_pipelined(rows_AD: torch.Tensor, counts_E: torch.Tensor, through: Callable, mesh, ep_mesh_dim: int,
                       chunks: int) -> torch.Tensor:
    """``moe_dispatch._exchange`` in ``chunks`` pipelined pieces: the rows (grouped by expert) through their
    experts on their ranks and back, in the same order. ``through(received_RD, counts_nL)`` runs this rank's
    experts on rows received ordered by (source rank, expert), ``counts_nL`` of each, and returns them in
    that order."""
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
        return all_to_all_splits(rows, mesh, ep_mesh_dim, *splits, async_op=True), splits

    dispatch, outs, combine = [start(0, sent[0])], [], []
    for c in range(chunks):
        pending, splits = dispatch[c]
        received = _Arrived.apply(sent[c], pending, mesh, ep_mesh_dim, *splits)
        if c + 1 < chunks:  # in flight while the experts compute chunk c
            dispatch.append(start(c + 1, sent[c + 1]))
        outs.append(through(received, recv_CnL[c]))
        combine.append(start(c, outs[c], forward=False))  # in flight while the experts compute chunk c + 1
    back = [_Arrived.apply(out, pending, mesh, ep_mesh_dim, *splits) for out, (pending, splits) in zip(outs, combine)]
    return torch.cat(back)[torch.argsort(torch.cat(index))]

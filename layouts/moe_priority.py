"""Lina: the MoE's all-to-alls before the gradient all-reduce. Under data parallelism with expert parallelism on
the same ranks, backward issues each gradient bucket's all-reduce as soon as the bucket fills, and the MoE's
backward all-to-alls, issued later on the same process group, queue behind it: c10d runs a group's collectives
in the order they were issued, so an all-to-all waits for a whole 25 MiB all-reduce before it moves a row.

``AllToAllFirst`` is the scheduler the buckets hand their all-reduce to (``replicate(...,
all_reduce_launcher=scheduler)``) and the MoE tells its gaps (``MoE.comm_priority = scheduler``). The launcher
takes every sum bucket of ``replicate``: local compute's flat buckets (layouts/data_flat.py) and the DTensor path's
(a module holding a MoE runs there), so the model may be replicated whole or its dense modules apart from the MoE
layers (tests/layouts/test_moe_priority.py does both). It cuts each
bucket's flat buffer into pieces of ``piece_bytes`` (Lina's micro-ops) and keeps them in one queue, issuing

* ``pieces_per_gap`` pieces when a bucket is handed over (the all-reduce still starts during backward), and
  ``pieces_per_gap`` more each time the MoE's backward all-to-all arrives (the gap before its next one);
* the rest, in queue order, when a bucket's result is waited for (the end of backward).

So an all-to-all waits behind at most the pieces of one gap, not behind a bucket. Every decision is taken at a
point of the program (a bucket handed over, an all-to-all arrived, a result waited for), never by timing, so
every rank issues the same collectives in the same order. Bytes: the bucket's, in more messages.

Legend: B elements of a bucket's buffer.
"""

from __future__ import annotations

from collections import deque

import torch

from dtensor_plus import collectives

__all__ = ["AllToAllFirst"]


class _Piece:
    """One slice of a bucket's flat buffer and, once issued, its pending all-reduce."""

    def __init__(self, values: torch.Tensor, mesh, mesh_dim: int):
        self.values, self.mesh, self.mesh_dim, self.pending = values, mesh, mesh_dim, None

    def issue(self) -> None:
        self.pending = collectives.all_reduce(self.values, self.mesh, self.mesh_dim, "sum", async_op=True)


class _PiecedAllReduce:
    """A bucket's all-reduce in pieces; ``wait()`` issues what is still queued up to its last piece, waits for
    all of its pieces and returns the summed buffer (a new tensor, as ``collectives.all_reduce`` does)."""

    def __init__(self, scheduler: "AllToAllFirst", shape: torch.Size, pieces: list[_Piece]):
        self.scheduler, self.shape, self.pieces = scheduler, shape, pieces

    def wait(self) -> torch.Tensor:
        if self.pieces:
            self.scheduler.issue_through(self.pieces[-1])
        return torch.cat([piece.pending.wait() for piece in self.pieces]).view(self.shape)


class AllToAllFirst:
    """Lina's scheduling of the gradient all-reduce around the MoE's backward all-to-alls (see the module doc).

    Args:
        piece_bytes: the size of one all-reduce piece (Lina: small enough that an all-to-all waits little
            behind one, large enough that each piece's own latency stays small). 4 MiB was the best of 256 KiB,
            1 MiB and 4 MiB on CPU gloo (benchmarks/moe_priority.py); tune it per link.
        pieces_per_gap: pieces issued when a bucket is handed over and at each gap the MoE reports.
    """

    def __init__(self, piece_bytes: int = 4 * 2**20, pieces_per_gap: int = 1):
        if piece_bytes < 1 or pieces_per_gap < 1:
            raise ValueError(f"AllToAllFirst: piece_bytes and pieces_per_gap must be >= 1, got {piece_bytes} and "
                             f"{pieces_per_gap}")
        self.piece_bytes, self.pieces_per_gap = piece_bytes, pieces_per_gap
        self._queued: deque[_Piece] = deque()

    def __call__(self, buffer: torch.Tensor, mesh, mesh_dim: int) -> _PiecedAllReduce:
        """``replicate``'s ``all_reduce_launcher``: the sum all-reduce of a flat gradient buffer on ``mesh_dim``."""
        flat = buffer.reshape(-1)
        step = max(1, self.piece_bytes // flat.element_size())
        pieces = [_Piece(flat[start:start + step], mesh, mesh_dim) for start in range(0, flat.numel(), step)]
        self._queued.extend(pieces)
        self.gap()
        return _PiecedAllReduce(self, buffer.shape, pieces)

    def gap(self) -> None:
        """No all-to-all is waiting to go: issue the next ``pieces_per_gap`` pieces (the MoE calls this each
        time one of its backward all-to-alls has arrived)."""
        for _ in range(min(self.pieces_per_gap, len(self._queued))):
            self._queued.popleft().issue()

    def issue_through(self, piece: _Piece) -> None:
        """Issue the queued pieces in order up to ``piece``."""
        while piece.pending is None:
            self._queued.popleft().issue()

    @property
    def queued(self) -> int:
        """Pieces handed over and not issued yet."""
        return len(self._queued)

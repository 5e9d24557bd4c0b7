"""Buckets: tensors grouped by key into flat buffers of at most ``cap_bytes``, ONE collective per buffer.

Data parallelism's gradient reduction (layouts/data.py), ZeRO-1/2's reduce-scatter during backward
(layouts/zero_optimizer.py) and the planner's packer (``redistribute_together``) all do the same three things:
group tensors that can share a collective (same mesh, mesh dim, reduce op, dtype: the key), pack each group
into one flat buffer, and cut the result back into the tensors' shapes. This file owns those three things;
the collectives themselves come from ``dtensor_plus.collectives``, which counts them.

    Buckets(cap_bytes)           items grouped by key, in arrival order; a bucket closes once it holds cap_bytes
    flatten(ts) / unflatten      several tensors as one flat buffer, and that buffer as views shaped like them
    all_reduce_flat(ts, ...)     one all-reduce (per reduction) of several tensors' flat buffer
    BackwardBuckets              Buckets fed by post-accumulate-grad hooks: a full bucket starts at once (its
                                 collective overlaps the rest of backward), the rest when backward ends

Why a byte cap (DDP's ``bucket_cap_mb``, 25 MiB): one buffer per step would start its collective only once
backward has finished, and one per tensor pays the per-collective latency for every small bias; a bucket
that starts as soon as it is full does neither. Every decision depends on hook order and global metadata
only (the same on every rank), so every rank packs the same buckets in the same order::

    buckets = BackwardBuckets(25 * 2**20, start=lambda key, params: ..., finish=lambda: ...)
    param.register_post_accumulate_grad_hook(lambda p: buckets.add(key_of(p), p, nbytes_of(p)))
"""

from __future__ import annotations

from typing import Callable

import torch

from . import collectives

__all__ = ["Buckets", "BackwardBuckets", "flatten", "unflatten", "all_reduce_flat"]


class Buckets:
    """Items grouped by key in the order they arrive. With ``cap_bytes`` a key's bucket closes once the
    ``nbytes`` given with its items reach the cap (``add`` hands it back), and that key's next item opens a
    new one; without, buckets only close at ``drain``. ``first_cap_bytes`` (DDP's 1 MiB first bucket): the cap
    of the first bucket to close after each ``drain``, so the first collective starts early in a backward."""

    def __init__(self, cap_bytes: float | None = None, first_cap_bytes: float | None = None):
        self.cap_bytes, self.first_cap_bytes = cap_bytes, first_cap_bytes
        self._open: dict = {}  # key -> [items, bytes so far]
        self._closed_any = False  # since the last drain

    def add(self, key, item, nbytes: int = 0) -> list | None:
        """Put ``item`` in ``key``'s open bucket; return that bucket's items if this filled it, else None."""
        bucket = self._open.setdefault(key, [[], 0])
        bucket[0].append(item)
        bucket[1] += nbytes
        cap = self.cap_bytes
        if cap is not None and self.first_cap_bytes is not None and not self._closed_any:
            cap = min(cap, self.first_cap_bytes)
        if cap is not None and bucket[1] >= cap:
            self._closed_any = True
            return self._open.pop(key)[0]
        return None

    def drain(self) -> list[tuple]:
        """Every open bucket as (key, items), keys in the order their buckets opened; none stays open."""
        drained = [(key, items) for key, (items, _) in self._open.items()]
        self._open, self._closed_any = {}, False
        return drained

    def __len__(self) -> int:
        return len(self._open)


def flatten(tensors) -> torch.Tensor:
    """One new flat buffer holding ``tensors`` one after another (one dtype: c10d sends one)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, like) -> list[torch.Tensor]:
    """``flat`` cut into views shaped like the tensors of ``like`` (those ``flatten`` packed, in order): no copy."""
    return [piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in like]), like)]


class _Pending:
    """An ``all_reduce_flat`` in flight; ``wait()`` gives its tensors (None: already done)."""

    def __init__(self, pending, like, done=None):
        self._pending, self._like, self._done = pending, like, done

    def wait(self) -> list[torch.Tensor]:
        if self._done is None:
            self._done = unflatten(self._pending.wait(), self._like)
        return self._done


def all_reduce_flat(tensors, mesh, reductions, *, async_op: bool = False):
    """Several same-dtype tensors all-reduced as ONE flat buffer: one collective per (mesh_dim, reduce_op) of
    ``reductions`` (run in order; a mesh dim of one rank has nothing to reduce and is skipped) instead of one
    per tensor. Returns new tensors (views of one buffer, never ``tensors`` themselves) shaped like ``tensors``;
    with ``async_op`` the last all-reduce is left in flight and an object whose ``wait()`` returns them. Bytes:
    the per-tensor all-reduces'."""
    tensors = list(tensors)
    if not tensors:
        return _Pending(None, [], done=[]) if async_op else []
    flat = flatten(tensors)
    reductions = [(k, op) for k, op in reductions if mesh.size(k) > 1]
    if not reductions:  # still new tensors: the caller may write into them
        return _Pending(None, tensors, done=unflatten(flat, tensors)) if async_op else unflatten(flat, tensors)
    *first, (last_dim, last_op) = reductions
    for mesh_dim, reduce_op in first:
        flat = collectives.all_reduce(flat, mesh, mesh_dim, reduce_op)
    if async_op:
        return _Pending(collectives.all_reduce(flat, mesh, last_dim, last_op, async_op=True), tensors)
    return unflatten(collectives.all_reduce(flat, mesh, last_dim, last_op), tensors)


class BackwardBuckets:
    """``Buckets`` filled from post-accumulate-grad hooks during a backward.

    ``start(key, items)`` runs for a bucket as soon as ``add`` fills it, and for every bucket still open when
    the backward ends, followed by ``finish()``. Hooks fire in the same order on every rank (the same graph),
    so every rank starts the same buckets in the same order. ``flush()`` does the end-of-backward work early
    (e.g. in an optimizer step, for gradients accumulated outside any hook)."""

    def __init__(self, cap_bytes: float | None, start: Callable, finish: Callable | None = None, *,
                 first_cap_bytes: float | None = None):
        self.buckets = Buckets(cap_bytes, first_cap_bytes)
        self._start, self._finish = start, finish
        self._flush_queued = False

    def add(self, key, item, nbytes: int) -> None:
        if not self._flush_queued:  # the end of this backward starts whatever is left open
            torch.autograd.Variable._execution_engine.queue_callback(self.flush)
            self._flush_queued = True
        full = self.buckets.add(key, item, nbytes)
        if full is not None:
            self._start(key, full)

    def flush(self) -> None:
        """Start every open bucket, then ``finish()``."""
        self._flush_queued = False
        for key, items in self.buckets.drain():
            self._start(key, items)
        if self._finish is not None:
            self._finish()

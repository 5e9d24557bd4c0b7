"""A DTensor cut from a batch every rank holds whole remembers that whole, so a reduction that only needs a total
over the global batch (a mean loss's count of kept targets) is computed on each rank, with no collective.

Why: a mean ``nll_loss`` over batch-sharded targets divides the local sum by the *global* total weight (the kept
targets, or their class weights): one all-reduce of one scalar per step (ops/losses.py), which costs data
parallelism a latency-bound collective on the loss's critical path that DDP does not pay (DDP averages per-rank
means: inexact for uneven batches and ``ignore_index``). But with ``shard_batch`` every rank was handed the whole
batch and kept its rows: the global targets are still on every rank, and the total is a local count over them.

The record: ``shard_batch`` stores the whole it cut (integer batches: targets, token ids) on the DTensor it returns;
a view op on a recorded DTensor records on its result the same view of the whole (``targets.flatten(0, 1)``,
``labels[:, 1:]``: the view of the global tensor is the global tensor of the view), and so does a copy
(``COPIES``: ``clone``, and ``_unsafe_view``, with which ``reshape`` ends where it had to copy a non-contiguous
view, as in ``labels[:, 1:].reshape(-1)``). A rule that can use it names
the argument (``Sharding.whole_batch_of``) and its local op receives ``whole_batch=`` that argument's whole, or
None (then it communicates as before).

Every rank decides alike, or a rank would skip a collective its peers wait on: the record lives on the DTensor
(the wrapper every rank makes alike), never on a block (blocks are shared or copied rank by rank); it is set by
``shard_batch``, which every rank calls, and carried by view ops, which every rank dispatches; any other op's
result has none. It is void once either side may have changed: the whole's version counter (the user wrote into
their batch) or the DTensor's own, which its views share (an in-place op on it or on a view of it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["remember", "whole_of", "carry_view", "COPIES"]

_RECORD = "_dtensor_plus_whole_batch"  # on a DTensor's __dict__
_aten = torch.ops.aten
COPIES = frozenset({_aten.clone.default, _aten._unsafe_view.default})  # carried like views (module docstring)


class _Record(NamedTuple):
    whole: torch.Tensor  # the global tensor, the same on every rank
    whole_version: int  # whole._version when recorded
    version: int  # the DTensor's _version when recorded


def remember(dtensor: torch.Tensor, whole: torch.Tensor) -> None:
    """Record that ``whole`` (held by every rank) is ``dtensor``'s global value."""
    dtensor.__dict__[_RECORD] = _Record(whole, whole._version, dtensor._version)


def whole_of(dtensor: torch.Tensor) -> torch.Tensor | None:
    """``dtensor``'s global value as every rank holds it, or None (never recorded, or written into since)."""
    record = dtensor.__dict__.get(_RECORD)
    if record is None or record.whole._version != record.whole_version or dtensor._version != record.version:
        return None
    return record.whole


def carry_view(view: torch.Tensor, base: torch.Tensor, aten_func, args, kwargs) -> None:
    """After a view op (or one of ``COPIES``) ``aten_func(base, *args[1:], **kwargs)`` made ``view``: its record,
    if ``base`` has one."""
    if _RECORD not in base.__dict__:
        return
    whole = whole_of(base)
    if whole is not None:
        remember(view, aten_func(whole, *args[1:], **kwargs))

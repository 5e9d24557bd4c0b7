"""Splitting a batch into pipeline microbatches along dim 0 (and, for the sequence schedules, along dim 1) and
merging the last stage's outputs back.

A DTensor batch is split on its local shard: with the batch Shard(0) on dp, microbatch i is every dp rank's
i-th slice of its rows. That is not global rows [i*B/m, (i+1)*B/m), but every microbatch holds B/m rows, so
the mean of the microbatch losses is the batch loss and the gradients equal one device's on the whole batch.
"""

from __future__ import annotations

import torch

from dtensor_plus.dtensor import DTensor
from dtensor_plus.placements import Replicate, Shard
from dtensor_plus.renamed import renamed_keywords

__all__ = ["split_microbatches", "merge_microbatches", "split_sequence_microbatches", "merge_sequence_microbatches"]


@renamed_keywords(num_microbatches="n_microbatches")
def split_microbatches(batch: torch.Tensor, n_microbatches: int) -> list[torch.Tensor]:
    """``n_microbatches`` equal pieces of ``batch`` along dim 0 (plain tensor or DTensor)."""
    local = batch._local_tensor if isinstance(batch, DTensor) else batch
    if local.ndim == 0 or local.shape[0] % n_microbatches:
        raise ValueError(f"a batch of {tuple(local.shape)} rows per rank does not split into {n_microbatches} equal "
                         "microbatches along dim 0; make the (per-rank) batch a multiple of the microbatch count")
    pieces = local.tensor_split(n_microbatches, dim=0)
    if not isinstance(batch, DTensor):
        return list(pieces)
    bad = [p for p in batch.placements if type(p) not in (Shard, Replicate)]
    if bad:
        raise ValueError(f"split_microbatches: placements {list(batch.placements)} of the batch; use Shard or Replicate")
    shape = (batch.shape[0] // n_microbatches,) + tuple(batch.shape[1:])
    return [DTensor.from_local(p, batch.device_mesh, batch.placements, shape=shape) for p in pieces]


def merge_microbatches(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The pieces concatenated along dim 0 (the inverse of ``split_microbatches``)."""
    first = pieces[0]
    if not isinstance(first, DTensor):
        return torch.cat(pieces)
    local = torch.cat([p._local_tensor for p in pieces])
    shape = (sum(p.shape[0] for p in pieces),) + tuple(first.shape[1:])
    return DTensor.from_local(local, first.device_mesh, first.placements, shape=shape)


def split_sequence_microbatches(batch: torch.Tensor, n_samples: int, lengths: tuple[int, ...]) -> list[torch.Tensor]:
    """Sequence-level units (TeraPipe, Seq1F1B): ``n_samples`` microbatches along dim 0, each cut along dim 1 into
    chunks of ``lengths``; unit u is chunk ``u % len(lengths)`` of sample ``u // len(lengths)``."""
    if batch.ndim < 2 or batch.shape[1] != sum(lengths):
        raise ValueError(f"a batch of shape {tuple(batch.shape)} does not cut into sequence chunks of {lengths} along "
                         "dim 1; pass (batch, sequence, ...) tensors")
    if isinstance(batch, DTensor) and any(p.is_shard() and p.dim % batch.ndim != 0 for p in batch.placements):
        raise ValueError(f"a batch placed {list(batch.placements)} is sharded along another dim than the batch; the "
                         "sequence schedules cut dim 1 on every rank alike: shard the batch on dim 0 only")
    return [_sequence_chunk(sample, start, length) for sample in split_microbatches(batch, n_samples)
            for start, length in zip(_starts(lengths), lengths)]


def _starts(lengths):
    return [sum(lengths[:j]) for j in range(len(lengths))]


def _sequence_chunk(sample: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Positions [start, start + length) of ``sample`` along dim 1 (a DTensor's: of its local block, dim 1 whole)."""
    if not isinstance(sample, DTensor):
        return sample.narrow(1, start, length)
    shape = (sample.shape[0], length) + tuple(sample.shape[2:])
    return DTensor.from_local(sample._local_tensor.narrow(1, start, length), sample.device_mesh, sample.placements,
                              shape=shape)


def merge_sequence_microbatches(pieces: list[torch.Tensor], num_chunks: int) -> torch.Tensor:
    """The units of ``split_sequence_microbatches`` put back: each sample's chunks along dim 1, the samples along 0."""
    first = pieces[0]
    if not isinstance(first, DTensor):
        return torch.cat([torch.cat(pieces[i : i + num_chunks], dim=1) for i in range(0, len(pieces), num_chunks)])
    local = torch.cat([torch.cat([p._local_tensor for p in pieces[i : i + num_chunks]], dim=1)
                       for i in range(0, len(pieces), num_chunks)])
    shape = (sum(p.shape[0] for p in pieces[::num_chunks]), sum(p.shape[1] for p in pieces[:num_chunks]))
    return DTensor.from_local(local, first.device_mesh, first.placements, shape=shape + tuple(first.shape[2:]))

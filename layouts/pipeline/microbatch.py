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
    if isinstance(batch, DTensor):
        raise ValueError("sequence chunks cut plain tensors; run the sequence schedules on a pp-only mesh "
                         "(a DTensor batch would need its sequence dim cut on every rank alike)")
    if batch.ndim < 2 or batch.shape[1] != sum(lengths):
        raise ValueError(f"a batch of shape {tuple(batch.shape)} does not cut into sequence chunks of {lengths} along "
                         "dim 1; pass (batch, sequence, ...) tensors")
    return [chunk for sample in split_microbatches(batch, n_samples) for chunk in sample.split(list(lengths), dim=1)]


def merge_sequence_microbatches(pieces: list[torch.Tensor], num_chunks: int) -> torch.Tensor:
    """The units of ``split_sequence_microbatches`` put back: each sample's chunks along dim 1, the samples along 0."""
    samples = [torch.cat(pieces[i : i + num_chunks], dim=1) for i in range(0, len(pieces), num_chunks)]
    return torch.cat(samples)

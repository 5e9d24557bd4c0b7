"""Sequence chunks executed (TeraPipe, Seq1F1B): which chunk a stage runs, and the keys and values a chunk's
attention reads from the earlier chunks of its sample, with their gradients routed back.

The executor cuts every sample microbatch along the sequence into k chunks (``SequenceSplit``; lengths as
``tensor_split`` gives them, the first ``T % k`` one longer) and calls a stage's module as
``module(x, sequence_chunk=chunk)``, ``chunk`` a ``SequenceChunk``: sample, chunk index, its first position
(the sum of the earlier chunks' lengths) and its length. An attention layer keeps causal attention exact by
asking ``chunk.keys_values(self, k, v)`` for the keys and values of positions ``[0, start + length)``::

    k_all, v_all = sequence_chunk.keys_values(self, k_BHTK, v_BHTK)    # (B, H, start + length, K)
    mask = causal_TT[start : start + length, : start + length]

How the gradient reaches the earlier chunks. Chunk i hands its keys and values to the stage's cache of its sample
as detached leaves that require grad; the later chunks of the sample read those leaves, so their backwards
accumulate into the leaves' ``.grad``. Chunk i's own graph passes its keys and values through ``_PlusLaterGrad``,
an identity whose backward adds the leaves' ``.grad``. The schedule runs chunk j's backward before chunk j-1's on
every stage (``validate`` checks it), so by chunk i's backward every later chunk's share is in. After chunk i's
backward the cache lets go of chunk i's leaves (every forward of the sample ran before its first backward, and
every later chunk's backward before this one), and the cache of a sample is dropped after its chunk 0's backward
(``PipelineStage.backward_one``): a sample's keys and values live no longer than its chunks' activations.

The fused backward only: a zero-bubble B (``backward.py``) computes the input gradient alone with
``autograd.grad``, which does not accumulate into the cached leaves; the executor refuses the combination.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["SequenceSplit", "SequenceChunk", "KeyValueCache", "chunk_lengths"]


def chunk_lengths(seq_len: int, num_chunks: int) -> tuple[int, ...]:
    """The lengths of ``num_chunks`` chunks of a ``seq_len`` sequence, as ``tensor_split`` cuts it."""
    if not (isinstance(seq_len, int) and isinstance(num_chunks, int) and seq_len >= num_chunks >= 1):
        raise ValueError(f"a sequence of {seq_len} positions does not split into {num_chunks} non-empty chunks; "
                         f"use at most {seq_len} sequence chunks (or longer sequences)")
    base, extra = divmod(seq_len, num_chunks)
    return tuple(base + (j < extra) for j in range(num_chunks))


@dataclass(frozen=True)
class SequenceSplit:
    """One step's cut: ``num_samples`` sample microbatches of ``seq_len`` positions, each in ``num_chunks``
    chunks. Unit (schedule microbatch) u is chunk ``u % num_chunks`` of sample ``u // num_chunks``."""

    num_samples: int
    num_chunks: int
    seq_len: int
    lengths: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "lengths", chunk_lengths(self.seq_len, self.num_chunks))

    def sample_and_chunk(self, unit: int) -> tuple[int, int]:
        return divmod(unit, self.num_chunks)

    def length(self, unit: int) -> int:
        return self.lengths[unit % self.num_chunks]

    def start(self, unit: int) -> int:
        return sum(self.lengths[: unit % self.num_chunks])

    def loss_weight(self, unit: int) -> float:
        """The weight of unit u's mean loss in the batch mean over every token: its share of the sample's
        positions, over the samples (every sample microbatch holds the same rows)."""
        return self.length(unit) / self.seq_len / self.num_samples

    def chunk(self, unit: int, cache: KeyValueCache) -> SequenceChunk:
        sample, chunk = self.sample_and_chunk(unit)
        return SequenceChunk(sample, chunk, self.num_chunks, self.start(unit), self.length(unit), cache)


class _PlusLaterGrad(torch.autograd.Function):
    """Identity on a chunk's keys (or values); its backward adds the gradient the later chunks left on the cached
    leaf (complete by then: the later chunks' backwards ran first)."""

    @staticmethod
    def forward(ctx, kv: torch.Tensor, leaf_holder: list) -> torch.Tensor:
        ctx.leaf_holder = leaf_holder  # a list, not a tensor input: autograd must not route gradient to the leaf
        return kv.view_as(kv)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        later = ctx.leaf_holder[0].grad
        return (grad if later is None else grad + later), None


class KeyValueCache:
    """The keys and values one stage's chunks of one sample hand to the later chunks: per attention layer, one
    (keys, values) pair of detached leaves per chunk so far."""

    def __init__(self, stage_index: int, sample: int):
        self.stage_index, self.sample = stage_index, sample
        self._layers: dict[int, list] = {}  # id(layer) -> (keys, values) leaves in chunk order; None once released

    def earlier(self, layer, chunk: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = self._layers.setdefault(id(layer), [])
        if None in pairs:
            raise RuntimeError(f"stage {self.stage_index}, sample {self.sample}: chunk {chunk}'s forward after a "
                               "backward of its sample; a schedule runs every chunk's forward before the sample's "
                               "first backward (validate)")
        if len(pairs) != chunk:
            raise RuntimeError(f"stage {self.stage_index}, sample {self.sample}: chunk {chunk} of layer "
                               f"{type(layer).__name__} finds the keys and values of {len(pairs)} earlier chunks; a "
                               "sample's chunks must run their forwards in order, each attention layer asking once")
        return list(pairs)

    def release(self, chunk: int) -> None:
        """After chunk ``chunk``'s backward: no chunk reads its keys and values any more."""
        for pairs in self._layers.values():
            if chunk < len(pairs):
                pairs[chunk] = None

    def add(self, layer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep detached leaves of ``k`` and ``v`` for the later chunks; returns k and v with their gradient hook."""
        leaves = [t.detach().requires_grad_(True) for t in (k, v)]
        self._layers[id(layer)].append((leaves[0], leaves[1]))
        return _PlusLaterGrad.apply(k, [leaves[0]]), _PlusLaterGrad.apply(v, [leaves[1]])


@dataclass(frozen=True)
class SequenceChunk:
    """What a stage module is told about the chunk it runs: ``positions [start, start + length)`` of
    sample ``sample``, chunk ``chunk`` of ``num_chunks``."""

    sample: int
    chunk: int
    num_chunks: int
    start: int
    length: int
    cache: KeyValueCache = field(repr=False, compare=False)

    @property
    def is_last(self) -> bool:
        return self.chunk == self.num_chunks - 1

    def keys_values(self, layer, k: torch.Tensor, v: torch.Tensor, dim: int = -2):
        """The keys and values of positions ``[0, start + length)`` for ``layer`` (any object, the same one every
        chunk): the earlier chunks' (cached leaves) before this chunk's ``k`` and ``v`` along ``dim``."""
        if type(k) is not torch.Tensor or type(v) is not torch.Tensor:
            raise TypeError(f"sequence chunks cache plain tensors' keys and values, got {type(k).__name__}: run the "
                            "stages on pp, with dp through replicate's local compute (each rank's rows as plain "
                            "tensors); tensor parallelism or ZeRO-3 inside a stage is not chunked")
        if k.shape[dim] != self.length or v.shape[dim] != self.length:
            raise ValueError(f"chunk {self.chunk} holds {self.length} positions, keys and values have "
                             f"{k.shape[dim]} and {v.shape[dim]} along dim {dim}; pass the sequence dim")
        earlier = self.cache.earlier(layer, self.chunk)
        if not self.is_last:
            k, v = self.cache.add(layer, k, v)
        if not earlier:
            return k, v
        return (torch.cat([pair[0] for pair in earlier] + [k], dim),
                torch.cat([pair[1] for pair in earlier] + [v], dim))

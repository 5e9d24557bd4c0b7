"""Sequence-level pipelines: each sample split along the sequence into k chunks that flow through the pipeline
as microbatches of their own, the causal dependency kept (TeraPipe, Li et al. ICML 2021; Seq1F1B, Sun et al.
2024, arXiv 2406.03488).

A chunk attends to the keys and values of the earlier chunks of its sample, so on every stage chunk j's forward
comes after chunk j-1's, and its backward, which sends gradient into those keys and values, before chunk j-1's
(``Schedule.sequence_chunks`` makes the validator check both). Schedule microbatch u is chunk u % k of sample
microbatch u // k. Smaller units shrink the bubble, (p-1)/(k*m + p-1) with k*m units instead of m, and Seq1F1B's
1F1B order holds p + k - 1 chunk activations on the first rank instead of 1F1B's p whole microbatches (p*k chunks).
The executor runs them (``build_schedule("seq1f1b", p, m, sequence_chunks=k)``): ``sequence_chunks.py`` cuts the
samples and routes the keys and values between a sample's chunks.

    >>> from dtensor_plus.layouts.pipeline.schedules_sequence import seq1f1b
    >>> seq1f1b(p=2, m=1, k=2).actions[1][:4]
    (RECV_F1.0, F1.0, RECV_F1.1, F1.1)
"""

from __future__ import annotations

from .actions import Action, Kind, Schedule
from .schedules import _check_counts, with_communication

__all__ = ["seq1f1b", "terapipe", "SEQUENCE_SCHEDULES"]


def _backward_order(m: int, k: int) -> list[int]:
    """Units in backward order: sample by sample, each sample's chunks last to first."""
    return [mb * k + (k - 1 - j) for mb in range(m) for j in range(k)]


def terapipe(p: int, m: int, k: int) -> Schedule:
    """TeraPipe: GPipe over the k*m sequence chunks, every forward then every backward (last chunk of a sample
    first). Bubble (p-1)/(k*m + p-1) with equal chunks; peak in-flight k*m chunks (all of them)."""
    _check_counts("terapipe", p, m, k)
    compute = [[Action(Kind.F, r, u) for u in range(m * k)] + [Action(Kind.BW, r, u) for u in _backward_order(m, k)]
               for r in range(p)]
    return with_communication("terapipe", m * k, range(p), compute, sequence_chunks=k)


def seq1f1b(p: int, m: int, k: int) -> Schedule:
    """Seq1F1B: 1F1B over sequence chunks. Rank r warms up with p-1-r + k-1 forwards: the backward of a sample's
    last chunk needs all its chunks' forwards (its keys and values) on this rank, and the later ranks' first
    backward needs this rank's chunks; then one forward, one backward; then the remaining backwards.
    Bubble (p-1)/(k*m + p-1) with equal chunks (F and BW the same for every chunk: the paper's assumption before
    it balances chunk lengths for attention's growing cost); peak in-flight p + k - 1 chunks on rank 0."""
    _check_counts("seq1f1b", p, m, k)
    units, backward = m * k, _backward_order(m, k)
    compute = []
    for r in range(p):
        warmup = min(p - 1 - r + k - 1, units)
        order = [Action(Kind.F, r, u) for u in range(warmup)]
        for i in range(units - warmup):
            order += [Action(Kind.F, r, warmup + i), Action(Kind.BW, r, backward[i])]
        order += [Action(Kind.BW, r, u) for u in backward[units - warmup:]]
        compute.append(order)
    return with_communication("seq1f1b", units, range(p), compute, sequence_chunks=k)


SEQUENCE_SCHEDULES = {"seq1f1b": seq1f1b, "terapipe": terapipe}  # by name, for build_schedule (they take k)

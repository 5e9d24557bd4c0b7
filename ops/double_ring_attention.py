"""Double-ring attention (LoongTrain, Gu et al. 2024): the ring over a 2-D context mesh, an inner ring (fast
links, e.g. inside a node) inside an outer one; installed by ``context_parallel(("outer", "inner"),
kind="double_ring")``, never registered globally.

q, k, v (B, H, T, D) are ``Shard(2)`` on both mesh dims, the outer first: rank (o, i) holds block i of the
outer chunk o, so its global block index is o*w + i (w inner ranks, m outer). The kv blocks travel in m
rounds. Round r starts with the block rank (o, i) got from the outer ring ((o - r, i)'s own; its own at r=0)
and passes it w-1 steps round the inner ring exactly as the flat ring does (ops/ring_attention.py: the same
forward and backward, run with ``DoubleRingRound`` as the geometry); meanwhile that round's starting block
goes one step on along the outer ring, ready for the next round. Per rank: m(w-1) inner shifts and m-1
outer ones, n-1 blocks in all like the flat ring of n = m*w, but only m-1 of the shifts cross the slow
links (a flat ring over those ranks crosses them on every step). Each round's (out, lse) merge exactly.

Backward: each round is the flat ring's backward over the inner ring (dq accumulates; the (dk, dv) of the
round's starting block come back to the rank that started it), and those per-round sums go home along the
outer ring like the flat ring's accumulators: started on the rank after the owner, one hop behind the
block, home on the last outer shift. 2m(w-1) inner and 2(m-1) outer shifts.

Causal (T == S, blocks in global order): a pair is full below the diagonal, the kernel's own diagonal on
it, skipped above; uneven and empty blocks (nested torch.chunk) as in the flat ring. GQA needs nothing.
Other mesh dims keep ops/attention.py's treatment (batch or heads local), so Ulysses may split heads on a
third, innermost mesh dim: LoongTrain's head-context 2-D attention (``kind="loongtrain"``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from dtensor_plus import strided
from dtensor_plus.declared import RingShift
from dtensor_plus.placements import Replicate, Shard, chunk_bounds
from dtensor_plus.rules import OpSchema, Sharding

from .attention import cpu_flash_backward_rule, cpu_flash_rule
from .ring_attention import DIAGONAL, FULL, SEQ, SKIP, _BACKWARD, _FORWARD, _merge, ring_backward, ring_forward

__all__ = ["double_ring_rules", "DoubleRingRound"]

_OUTER_KV_TAG, _OUTER_GRAD_TAG = 4, 6  # beside the inner ring's tags 0 and 2 (ops/ring_attention.py)


@dataclass(frozen=True)
class DoubleRingRound:
    """Round ``round`` of the double ring as the flat ring sees it: the inner ring of ``inner_dim``, whose
    kv blocks are the outer chunk ``(o - round) mod m`` (the geometry ring_forward / ring_backward read)."""

    mesh: object
    outer_dim: int
    inner_dim: int
    seq_q: int
    seq_kv: int
    causal: bool
    round: int

    @property
    def mesh_dim(self) -> int:  # the dim this round's shifts run on
        return self.inner_dim

    @property
    def size(self) -> int:
        return self.mesh.size(self.inner_dim)

    @property
    def index(self) -> int:
        return self.mesh.get_local_rank(self.inner_dim)

    def _outer(self) -> tuple[int, int]:
        return self.mesh.size(self.outer_dim), self.mesh.get_local_rank(self.outer_dim)

    def kv_block_at(self, step: int) -> int:
        return (self.index - step) % self.size

    def _block(self, seq: int, outer: int, inner: int) -> tuple[int, int]:
        """(start, length) of block (outer, inner) of a ``seq``-long dim: nested torch.chunk."""
        start, length = chunk_bounds(seq, self._outer()[0], outer)
        offset, inner_length = chunk_bounds(length, self.size, inner)
        return start + offset, inner_length

    def kv_outer(self) -> int:
        m, o = self._outer()
        return (o - self.round) % m

    def kv_length(self, inner: int) -> int:
        return self._block(self.seq_kv, self.kv_outer(), inner)[1]

    def pairs(self, step: int) -> list[tuple[slice, slice, str]]:
        q_outer, q_inner = self._outer()[1], self.index
        kv_outer, kv_inner = self.kv_outer(), self.kv_block_at(step)
        q_length, kv_length = self._block(self.seq_q, q_outer, q_inner)[1], self.kv_length(kv_inner)
        if q_length == 0 or kv_length == 0:
            return []
        q_block, kv_block = q_outer * self.size + q_inner, kv_outer * self.size + kv_inner
        kind = FULL if not self.causal or kv_block < q_block else DIAGONAL if kv_block == q_block else SKIP
        return [] if kind == SKIP else [(slice(0, q_length), slice(0, kv_length), kind)]

    def computes(self) -> bool:
        return any(self.pairs(step) for step in range(self.size))


def double_ring_rules(outer_dim: int | str, inner_dim: int | str) -> dict:
    """The rules ``context_parallel(kind="double_ring")`` installs: {aten op: rule} for the CPU SDPA kernels."""
    return {
        _FORWARD: functools.partial(_rule, outer_dim=outer_dim, inner_dim=inner_dim, default_rule=cpu_flash_rule,
                                    local_op=_double_ring_forward, shifts_per_hop=1),
        _BACKWARD: functools.partial(_rule, outer_dim=outer_dim, inner_dim=inner_dim,
                                     default_rule=cpu_flash_backward_rule, local_op=_double_ring_backward,
                                     shifts_per_hop=2),
    }


def _double_ring_forward(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None,
                         rounds: list[DoubleRingRound], comm):
    out, lse, held = None, None, [key, value]
    for round_ in rounds:
        last = round_.round == len(rounds) - 1
        pending = None if last else _outer_shift(comm, held, round_, _OUTER_KV_TAG)  # overlaps the round
        out_r, lse_r = ring_forward(query, *held, dropout_p, is_causal, attn_mask=attn_mask, scale=scale,
                                    ring=round_, comm=comm)
        if round_.computes():  # a round with every pair above the diagonal returns placeholders: left out
            lse_r = lse_r.to(torch.promote_types(lse_r.dtype, torch.float32))
            out, lse = (out_r.to(lse_r.dtype), lse_r) if out is None else _merge(out, lse, out_r, lse_r)
        if not last:
            held = pending.wait()
    if out is None:  # nothing computed here (no heads, batch rows or q rows): the flat ring's empty outputs
        return out_r, lse_r
    return out.to(query.dtype), lse


def _double_ring_backward(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *,
                          attn_mask=None, scale=None, rounds: list[DoubleRingRound], comm):
    grad_q, own, traveling, held = None, None, None, [key, value]
    for round_ in rounds:
        last = round_.round == len(rounds) - 1
        pending = None if last else _outer_shift(comm, held, round_, _OUTER_KV_TAG)
        dq, *share = ring_backward(grad_out, query, *held, out, logsumexp, dropout_p, is_causal,
                                   attn_mask=attn_mask, scale=scale, ring=round_, comm=comm)
        share = [s.to(torch.promote_types(s.dtype, torch.float32)) for s in share]
        grad_q = dq.to(share[0].dtype) if grad_q is None else grad_q + dq
        if round_.round == 0:
            own = share  # this rank's block's sum over its own inner ring: it stays here
        else:  # block (o - round, i)'s sum: one outer hop behind its block, home on the last outer shift
            if traveling is not None:
                share = [a + b for a, b in zip(traveling.wait(), share)]
            traveling = _outer_shift(comm, share, round_, _OUTER_GRAD_TAG, kv_outer=round_.kv_outer())
        if not last:
            held = pending.wait()
    if traveling is not None:
        own = [a + b for a, b in zip(own, traveling.wait())]
    return grad_q.to(query.dtype), own[0].to(key.dtype), own[1].to(value.dtype)


def _outer_shift(comm, tensors, round_: DoubleRingRound, tag: int, kv_outer: int | None = None):
    """Pass blocks of outer chunk ``kv_outer`` (default: the round's) one step on along the outer ring; what
    arrives is the previous outer rank's: chunk kv_outer - 1, same inner index."""
    m = round_._outer()[0]
    arriving = ((round_.kv_outer() if kv_outer is None else kv_outer) - 1) % m
    length = round_._block(round_.seq_kv, arriving, round_.index)[1]
    shapes = []
    for t in tensors:
        shape = list(t.shape)
        shape[SEQ] = length
        shapes.append(torch.Size(shape))
    return comm.ring_shift(tensors, round_.outer_dim, recv_shapes=shapes, tag=tag, async_op=True)


def _rule(op: OpSchema, *, outer_dim, inner_dim, default_rule, local_op, shifts_per_hop: int) -> Sharding:
    outer, inner = op.mesh.mesh_dim_index(outer_dim), op.mesh.mesh_dim_index(inner_dim)  # names the mesh's dims
    if outer >= inner:
        raise ValueError(f"double ring attention: the outer mesh dim ({outer_dim!r}) must come before the inner "
                         f"one ({inner_dim!r}) in the mesh, so that q, k, v [Shard(2), Shard(2)] on them nest "
                         f"outer chunk then inner block; swap them in mesh_dim=(outer, inner)")
    query, key, value = op.arg("query"), op.arg("key"), op.arg("value")
    seq_q, seq_kv, causal = query.shape[SEQ], key.shape[SEQ], bool(op.arg("is_causal", False))
    on_both = all(t.ndim == 4 and t.placements[outer] == t.placements[inner] == Shard(SEQ)
                  for t in (query, key, value))
    if (not on_both or op.arg("attn_mask") is not None or seq_q == 0 or seq_kv == 0
            or (causal and seq_q != seq_kv)):
        return default_rule(op)  # the flat default (gathers what it must), exact

    def gathered(placements):
        return tuple(Replicate() if k in (outer, inner) and p == Shard(SEQ) else p for k, p in enumerate(placements))

    def on_rings(placements):
        return tuple(Shard(SEQ) if k in (outer, inner) else p for k, p in enumerate(placements))

    seen = [spec.with_placements(gathered(spec.placements)) for spec in op.specs]
    default = default_rule(strided.with_specs(op, seen))
    m = op.mesh.size(outer)
    rounds = [DoubleRingRound(op.mesh, outer, inner, seq_q, seq_kv, causal, r) for r in range(m)]
    w = op.mesh.size(inner)
    return Sharding(inputs=tuple(on_rings(p) for p in default.inputs_for(op)),
                    outputs=tuple(on_rings(p) for p in default.outputs),
                    local_op=functools.partial(local_op, rounds=rounds),
                    communication=(RingShift(inner, shifts_per_hop * m * (w - 1)),
                                   RingShift(outer, shifts_per_hop * (m - 1))))


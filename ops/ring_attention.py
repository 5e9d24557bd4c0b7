"""Ring attention: the sharding rule for scaled-dot-product attention whose q, k, v are sharded on the
sequence dim, installed by ``layouts.context_parallel(kind="ring")`` (never registered globally).

Shapes: q (B, H, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), out (B, H, T, Dv), logsumexp (B, H, T).
On the context-parallel mesh dim (n ranks, local index r) every one of them is Shard(2): rank r holds
the torch.chunk block r of the sequence. Each rank keeps its q block; the k/v blocks travel around the
ring (``collectives.ring_shift``: to r+1, from r-1), so at step t rank r holds kv block (r - t) mod n.

Forward: per kv block, the CPU flash kernel gives the block's output and log-sum-exp; blocks merge exactly
(out = sum_j exp(lse_j - lse) out_j with lse = logaddexp over j). n-1 shifts of (k, v); each is issued
asynchronously before the current block is computed, so the transfer overlaps the kernel.

Backward: the kernel's backward called on one kv block with the GLOBAL out and GLOBAL logsumexp of the q
block gives that block's exact share of dq, dk and dv (its softmax probabilities are the global ones). dq
accumulates in place. The owner keeps its own share of dk/dv; the other n-1 shares are summed by an
accumulator that starts on the rank after the owner, follows the kv block one step behind, and arrives home
on the last shift: n-1 shifts of (k, v) and n-1 of (dk, dv) per backward, 2(n-1) kv-sized blocks in all.
Accumulators travel in fp32 (or the inputs' dtype when wider), so bf16 inputs send fp32 gradient blocks.

Causal (top-left aligned, T == S so q and kv blocks share boundaries): block (i, j) is full if j < i, the
kernel's own causal diagonal if j == i, skipped if j > i. Causal with T != S keeps the default rule
(gathered, exact). Empty blocks (uneven shards) are skipped but still travel (as empty messages: no bytes).
GQA needs nothing: the CPU kernel takes fewer k/v heads than q heads (forward and backward).

Other mesh dims keep ops/attention.py's treatment (batch or heads sharded: local), so cp composes with dp
and with tp head sharding. Example::

    with context_parallel(mesh_dim="cp", kind="ring"):     # q, k, v: Shard(2) on "cp"
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from dtensor_plus import collectives
from dtensor_plus.placements import Placement, Shard, chunk_bounds
from dtensor_plus.rules import OpSchema, Sharding

from .attention import cpu_flash_backward_rule, cpu_flash_rule
from .common import aten

__all__ = ["ring_rules", "RingGeometry"]

SEQ = 2  # the sequence dim of q, k, v, out, grad_out and logsumexp
FULL, DIAGONAL, SKIP = "full", "diagonal", "skip"
_KV_TAG, _GRAD_TAG = 0, 2  # p2p tags of the two shifts that can be in flight at once (k, v and dk, dv)
_FORWARD = aten._scaled_dot_product_flash_attention_for_cpu.default
_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def ring_rules(mesh_dim: int | str) -> dict:
    """The rules ``context_parallel(kind="ring")`` installs: {aten op: rule} for the CPU SDPA kernels."""
    return {
        _FORWARD: functools.partial(_forward_rule, mesh_dim=mesh_dim),
        _BACKWARD: functools.partial(_backward_rule, mesh_dim=mesh_dim),
    }


# -- geometry: which block each rank holds, and which (q block, kv block) pairs are computed -----------------


@dataclass(frozen=True)
class RingGeometry:
    """Global metadata of one ring attention call: everything a rank needs to know about the others' blocks."""

    mesh: object
    mesh_dim: int
    seq_q: int
    seq_kv: int
    causal: bool

    @property
    def size(self) -> int:
        return self.mesh.size(self.mesh_dim)

    @property
    def index(self) -> int:
        return self.mesh.get_local_rank(self.mesh_dim)

    def kv_block_at(self, step: int) -> int:
        """The kv block this rank holds at ``step`` (it came ``step`` hops from its owner)."""
        return (self.index - step) % self.size

    def kv_length(self, block: int) -> int:
        return chunk_bounds(self.seq_kv, self.size, block)[1]

    def kind(self, q_block: int, kv_block: int) -> str:
        if chunk_bounds(self.seq_q, self.size, q_block)[1] == 0 or self.kv_length(kv_block) == 0:
            return SKIP
        if not self.causal or kv_block < q_block:
            return FULL
        return DIAGONAL if kv_block == q_block else SKIP


def _local_kind(ring: RingGeometry, step: int, query, kv) -> str:
    """The block's kind, or SKIP where another mesh dim left this rank no batch rows or heads: the CPU kernel
    divides by zero on an empty head dim. Only the compute is skipped; the ring's shifts never depend on it."""
    if min(query.numel(), kv[0].numel(), kv[1].numel()) == 0:
        return SKIP
    return ring.kind(ring.index, ring.kv_block_at(step))


def _with_length(t: torch.Tensor, length: int) -> torch.Size:
    shape = list(t.shape)
    shape[SEQ] = length
    return torch.Size(shape)


def _shift(tensors, ring: RingGeometry, step: int, tag: int):
    """Start passing the blocks held at ``step`` on; what arrives is block kv_block_at(step + 1)."""
    length = ring.kv_length(ring.kv_block_at(step + 1))
    return collectives.ring_shift(tensors, ring.mesh, ring.mesh_dim, recv_shapes=[_with_length(t, length) for t in tensors],
                                  tag=tag, async_op=True)


# -- forward ------------------------------------------------------------------------------------------------


def ring_forward(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None, ring: RingGeometry):
    """This rank's (out, logsumexp) for its q block, from every kv block passed around the ring."""
    _check_local_call(dropout_p, attn_mask)
    # Strict RNG mode changes nothing here: at dropout_p == 0 the kernel draws nothing, so the dispatcher hands
    # it local blocks like any other op (random.draws).
    kv, out, lse = [key, value], None, None
    for step in range(ring.size):
        pending = _shift(kv, ring, step, _KV_TAG) if step < ring.size - 1 else None  # overlaps the kernel
        kind = _local_kind(ring, step, query, kv)
        if kind != SKIP:
            out_b, lse_b = _FORWARD(query, kv[0], kv[1], 0.0, kind == DIAGONAL, scale=scale)
            out, lse = _merge(out, lse, out_b, lse_b)
        if pending is not None:
            kv = pending.wait()
    if out is None:  # an empty q block: nothing was computed
        return _empty_outputs(query, key, value, is_causal, scale)
    return out.to(query.dtype), lse


def _merge(out, lse, out_b, lse_b):
    """Exact softmax merge of two partial results over disjoint kv blocks. Every computed block has at least
    one visible key per row (full blocks are non-empty; a causal diagonal row sees its own key), so the
    log-sum-exps are finite."""
    lse_b = lse_b.to(torch.promote_types(lse_b.dtype, torch.float32))
    out_b = out_b.to(lse_b.dtype)
    if out is None:
        return out_b, lse_b
    merged = torch.logaddexp(lse, lse_b)
    out = out * (lse - merged).exp().unsqueeze(-1) + out_b * (lse_b - merged).exp().unsqueeze(-1)
    return out, merged


def _empty_outputs(query, key, value, is_causal, scale):
    metas = _FORWARD(*(t.to("meta") for t in (query, key, value)), 0.0, is_causal, scale=scale)
    return tuple(torch.zeros(m.shape, dtype=m.dtype, device=query.device) for m in metas)


# -- backward -----------------------------------------------------------------------------------------------


def ring_backward(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *, attn_mask=None,
                  scale=None, ring: RingGeometry):
    """This rank's (dq, dk, dv): dq of its q block; dk, dv of its kv block, gathered from every rank's share."""
    _check_local_call(dropout_p, attn_mask)
    acc_dtype = torch.promote_types(query.dtype, torch.float32)
    grad_q = torch.zeros(query.shape, dtype=acc_dtype, device=query.device)
    kv, own, traveling, pending_kv = [key, value], None, None, None
    for step in range(ring.size):
        if step < ring.size - 1:
            pending_kv = _shift(kv, ring, step, _KV_TAG)  # overlaps the kernel
        kind = _local_kind(ring, step, query, kv)
        if kind == SKIP:
            share = [torch.zeros(t.shape, dtype=acc_dtype, device=t.device) for t in kv]
        else:
            grad_q_b, *share = _BACKWARD(grad_out, query, kv[0], kv[1], out, logsumexp, 0.0, kind == DIAGONAL, scale=scale)
            grad_q += grad_q_b
            share = [t.to(acc_dtype) for t in share]
        if step == 0:
            own = share  # this rank's share of its own block: it stays here
        else:  # block (r - step)'s accumulator: started at step 1 on the rank after its owner, arrives home last
            if traveling is not None:
                received = traveling.wait()
                share = [a + b for a, b in zip(received, share)]
            traveling = _shift(share, ring, step, _GRAD_TAG)
        if step < ring.size - 1:
            kv = pending_kv.wait()
    grad_k, grad_v = (a + b for a, b in zip(own, traveling.wait()))
    return grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype)


def _check_local_call(dropout_p, attn_mask) -> None:
    # The rule sends these calls elsewhere; dropout is a float (never part of a rule's decision), so check here.
    assert attn_mask is None, "ring attention takes no attn_mask (the rule keeps the default for masks)"
    if dropout_p != 0.0:
        raise ValueError(f"ring attention runs the fused kernel without dropout, got dropout_p={dropout_p}; "
                         f"use dropout_p=0 inside context_parallel (torch decomposes dropout before it reaches us)")


# -- rules --------------------------------------------------------------------------------------------------


def _causal(op: OpSchema, query_index: int) -> bool:
    return bool(op.arg(query_index + (4 if query_index == 0 else 6), "is_causal", False))  # after dropout_p


def _ring_mesh_dim(op: OpSchema, mesh_dim, query_index: int) -> int | None:
    """The mesh dim index to ring over, or None when this call keeps the default rule."""
    mesh = op.mesh
    index = mesh.mesh_dim_index(mesh_dim)  # raises ValueError naming the mesh's dims
    query, key, value = (op.args[query_index + i] for i in range(3))
    if mesh.size(index) == 1 or op.kwargs.get("attn_mask") is not None:
        return None
    if any(t.ndim != 4 or not t.placements[index].is_shard(SEQ) for t in (query, key, value)):
        return None
    seq_q, seq_kv = query.shape[SEQ], key.shape[SEQ]
    causal = _causal(op, query_index)
    if seq_q == 0 or seq_kv == 0 or (causal and seq_q != seq_kv):
        return None
    return index


def _on_ring(placements: tuple[Placement, ...] | None, index: int):
    return placements[:index] + (Shard(SEQ),) + placements[index + 1:]


def _ring_sharding(default: Sharding, op: OpSchema, index: int, query_index: int, local_op) -> Sharding:
    """The default rule's placements on every other mesh dim; Shard(seq) on the ring's."""
    query, key = op.args[query_index], op.args[query_index + 1]
    ring = RingGeometry(op.mesh, index, query.shape[SEQ], key.shape[SEQ], _causal(op, query_index))
    return Sharding(inputs=tuple(_on_ring(p, index) for p in default.inputs),
                    outputs=tuple(_on_ring(p, index) for p in default.outputs),
                    local_op=functools.partial(local_op, ring=ring))


def _forward_rule(op: OpSchema, *, mesh_dim) -> Sharding:
    """(query, key, value, dropout_p, is_causal, *, attn_mask, scale) -> (output, logsumexp)."""
    default = cpu_flash_rule(op)
    index = _ring_mesh_dim(op, mesh_dim, 0)
    return default if index is None else _ring_sharding(default, op, index, 0, ring_forward)


def _backward_rule(op: OpSchema, *, mesh_dim) -> Sharding:
    """(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask, scale) -> grads."""
    default = cpu_flash_backward_rule(op)
    index = _ring_mesh_dim(op, mesh_dim, 1)
    return default if index is None else _ring_sharding(default, op, index, 1, ring_backward)

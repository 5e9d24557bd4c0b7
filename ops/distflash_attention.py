"""DistFlashAttn's load-balanced causal schedule (Li et al. 2023) on the plain ring layout; installed by
``context_parallel(load_balance="distflash")``, never registered globally.

q, k, v (B, H, T, D) are Shard(2) on the ring's mesh dim (n ranks, plain torch.chunk blocks, T == S). The
causal pairs (q block j, kv block i), i <= j, are split by their distance d = j - i: the diagonal (d = 0)
and the near pairs (d <= n/2) run on the q owner j, which receives kv block j-d from the ring as the flat
ring does (n/2 shifts instead of n-1); a far pair (d > n/2) runs on the kv owner i, which in the plain ring
would sit idle at that step (its kv block has wrapped round): it receives q_j (``ring_shift(hops=-d)``),
attends it to its own k, v and sends (out, lse) back (``hops=+d``) to merge exactly. Every rank computes
at most ceil((n+1)/2) blocks (the plain ring's last rank: n); no layout changes, unlike zigzag or striped.

Backward mirrors it: a near pair's (dk, dv) share goes straight home (``hops=-d``) and the q owner keeps
dq; a far pair's helper receives (q, out, lse, grad_out) of block j, keeps its (dk, dv) and returns dq.
Blocks a rank has none of (uneven T, empty blocks) travel as empty messages, so every rank issues the same
shifts. Non-causal calls, and zigzag or striped inputs, keep the flat ring (already balanced).

The paper's rematerialization-aware checkpointing (checkpoint at the attention output, so the backward's
recomputation skips attention and its shifts) is torch's selective checkpoint with the attention op saved
(``CheckpointPolicy.MUST_SAVE``, the rest recomputed): tests/layouts/test_distflash.py runs it; it is not yet a
named policy of layouts/recompute.py.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from dtensor_plus.declared import RingShift
from dtensor_plus.rules import OpSchema, Sharding

from .ring_attention import (_BACKWARD, _FORWARD, _KV_TAG, _GRAD_TAG, RingGeometry, _block_backward, _block_forward,
                             _merge, _rows, _shift, _with_length, ring_backward, ring_forward, ring_rules)

__all__ = ["distflash_rules", "distflash_blocks"]

_QUERY_TAG, _RESULT_TAG = 4, 8  # beside the kv and gradient shifts' tags (tensors i travel with tag + i)


def distflash_blocks(n: int) -> list[int]:
    """Blocks each of n ranks computes in the forward under the schedule (pairs of plain causal blocks)."""
    blocks = [0] * n
    for j in range(n):
        for i in range(j + 1):
            blocks[j if j - i <= n // 2 else i] += 1
    return blocks


def distflash_rules(mesh_dim: int | str) -> dict:
    """The flat ring's rules, with causal plain-block calls run on the balanced schedule."""
    flat = ring_rules(mesh_dim)
    return {_FORWARD: functools.partial(_rule, ring_rule=flat[_FORWARD], flat_op=ring_forward,
                                        local_op=distflash_forward, per_far_pair=2, kv_shifts=1),
            _BACKWARD: functools.partial(_rule, ring_rule=flat[_BACKWARD], flat_op=ring_backward,
                                         local_op=distflash_backward, per_far_pair=2, kv_shifts=2)}


def _rule(op: OpSchema, *, ring_rule, flat_op, local_op, per_far_pair: int, kv_shifts: int) -> Sharding:
    decided = ring_rule(op)
    ring = getattr(decided.local_op, "keywords", {}).get("ring") if getattr(decided.local_op, "func", None) is flat_op else None
    if ring is None or not ring.causal or ring.zigzag or ring.striped:
        return decided  # the default rule, or the flat ring (non-causal or already balanced)
    half = ring.size // 2
    steps = kv_shifts * half + per_far_pair * (ring.size - 1 - half)
    return dataclasses.replace(decided, local_op=functools.partial(local_op, ring=ring),
                               communication=(RingShift(ring.mesh_dim, steps),))


def _hop(comm, tensors, ring: RingGeometry, hops: int, rows: int, tag: int):
    """Shift ``tensors`` by ``hops`` ranks on the ring; what arrives has ``rows`` sequence rows."""
    return comm.ring_shift(tensors, ring.mesh_dim, recv_shapes=[_with_length(t, rows) for t in tensors], tag=tag,
                           hops=hops)


def _part(t: torch.Tensor, keep: bool) -> torch.Tensor:
    return t if keep else _rows(t, slice(0, 0))


def distflash_forward(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None,
                      ring: RingGeometry, comm):
    n, k, half = ring.size, ring.index, ring.size // 2
    rows = [ring.kv_length(r) for r in range(n)]  # T == S: q and kv blocks alike
    local = min(query.numel(), key.numel(), value.numel()) > 0  # another mesh dim may leave no heads or batch
    lse = torch.full(query.shape[:3], -torch.inf, dtype=torch.promote_types(query.dtype, torch.float32),
                     device=query.device)
    out = lse.new_zeros(lse.shape + value.shape[-1:])

    def merge(out_b, lse_b):
        nonlocal out, lse
        out, lse = _merge(out, lse, out_b, lse_b)

    if local and rows[k]:
        merge(*_block_forward(query, key, value, True, scale))
    kv = [key, value]
    for d in range(1, half + 1):  # near pairs: the q owner attends kv block k-d, brought by the ring
        kv = _shift(comm, kv, ring, d - 1, _KV_TAG).wait()
        if local and k >= d and rows[k] and rows[k - d]:
            merge(*_block_forward(query, *kv, False, scale))
    for d in range(half + 1, n):  # far pairs: the kv owner attends q block k+d and sends the result back
        (q_far,) = _hop(comm, [_part(query, k >= d)], ring, -d, rows[k + d] if k + d < n else 0, _QUERY_TAG)
        result = [out[..., :0, :], lse[..., :0]]
        if k + d < n:
            result = list(_block_forward(q_far, key, value, False, scale)) if local and q_far.shape[2] and rows[k] \
                else [out.new_zeros(_with_length(out, q_far.shape[2])), lse.new_full(_with_length(lse, q_far.shape[2]), -torch.inf)]
            result = [result[0].to(out.dtype), result[1].to(lse.dtype)]
        out_b, lse_b = _hop(comm, result, ring, d, rows[k] if k >= d else 0, _RESULT_TAG)
        if k >= d and rows[k]:
            merge(out_b, lse_b)
    return out.to(query.dtype), lse


def distflash_backward(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *,
                       attn_mask=None, scale=None, ring: RingGeometry, comm):
    n, k, half = ring.size, ring.index, ring.size // 2
    rows = [ring.kv_length(r) for r in range(n)]
    local = min(query.numel(), key.numel(), value.numel()) > 0
    acc = torch.promote_types(query.dtype, torch.float32)
    grad_q = torch.zeros(query.shape, dtype=acc, device=query.device)
    grad_kv = [torch.zeros(t.shape, dtype=acc, device=t.device) for t in (key, value)]

    def add(totals, parts):
        for total, part in zip(totals, parts):
            total.add_(part)

    if local and rows[k]:
        grad_q_b, *grad_kv_b = _block_backward(grad_out, query, key, value, out, logsumexp, True, scale)
        grad_q.add_(grad_q_b)
        add(grad_kv, grad_kv_b)
    kv = [key, value]
    for d in range(1, half + 1):  # near pairs: dq stays, the (dk, dv) share goes home to kv owner k-d
        kv = _shift(comm, kv, ring, d - 1, _KV_TAG).wait()
        share = [torch.zeros(_with_length(t, rows[k - d] if k >= d else 0), dtype=acc, device=t.device) for t in kv]
        if local and k >= d and rows[k] and rows[k - d]:
            grad_q_b, *share = _block_backward(grad_out, query, *kv, out, logsumexp, False, scale)
            grad_q.add_(grad_q_b)
            share = [s.to(acc) for s in share]
        home = _hop(comm, share, ring, -d, rows[k] if k + d < n else 0, _GRAD_TAG)  # q owner k+d's share of mine
        if k + d < n:
            add(grad_kv, home)
    for d in range(half + 1, n):  # far pairs: the kv owner gets q block k+d's (q, out, lse, grad_out), returns dq
        mine = [_part(t, k >= d) for t in (query, out, logsumexp, grad_out)]
        q_far, out_far, lse_far, grad_far = _hop(comm, mine, ring, -d, rows[k + d] if k + d < n else 0, _QUERY_TAG)
        grad_q_far = torch.zeros(q_far.shape, dtype=acc, device=query.device)
        if local and k + d < n and q_far.shape[2] and rows[k]:
            grad_q_b, *grad_kv_b = _block_backward(grad_far, q_far, key, value, out_far, lse_far, False, scale)
            grad_q_far.add_(grad_q_b)
            add(grad_kv, grad_kv_b)
        (grad_q_b,) = _hop(comm, [grad_q_far], ring, d, rows[k] if k >= d else 0, _RESULT_TAG)
        if k >= d:
            grad_q.add_(grad_q_b)
    return grad_q.to(query.dtype), grad_kv[0].to(key.dtype), grad_kv[1].to(value.dtype)

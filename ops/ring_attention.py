"""Ring attention: the sharding rule for scaled-dot-product attention whose q, k, v are sharded on the
sequence dim, installed by ``layouts.context_parallel(kind="ring")`` (never registered globally).

Shapes: q (B, H, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), out (B, H, T, Dv), logsumexp (B, H, T).
On the context-parallel mesh dim (n ranks, local index r) every one of them is Shard(2): rank r holds
the torch.chunk block r of the sequence. Each rank keeps its q block; the k/v blocks travel around the
ring (a ring shift: to r+1, from r-1), so at step t rank r holds kv block (r - t) mod n. The rules declare
those shifts (``RingShift(mesh_dim, steps)`` in their Sharding) and the local ops run them through the
``comm`` the executor hands them: n-1 per forward, 2(n-1) per backward.

Forward: per kv block, the CPU flash kernel gives the block's output and log-sum-exp; blocks merge exactly
(out = sum_j exp(lse_j - lse) out_j with lse = logaddexp over j). n-1 shifts of (k, v); each is issued
asynchronously before the current block is computed, so the transfer overlaps the kernel. Where
``dtensor_plus.kernels.use_kernels`` allows, the block kernel is the Triton flash attention of
kernels/flash_attention.py (same (out, lse) and (dq, dk, dv) contract), else aten's CPU flash kernel.

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

Load balancing (zigzag): with plain blocks, causal rank r computes r+1 of the n diagonal-or-below blocks, so
the last rank does n times the first one's work. With q, k, v placed ``StridedShard(2, 1, zigzag=True)`` the
sequence is cut into 2n pieces (torch.chunk sizes) and rank r holds pieces r and 2n-1-r; every (q piece, kv
piece) pair is judged in GLOBAL piece order (full below, causal on, skipped above the diagonal), so each step
computes two full pairs on every rank, which share one side and run as one kernel call (two diagonals and
one full pair at step 0): equal work everywhere (2n+1 pairs per rank, against r+1 blocks of unequal rank r
before), the same n-1 shifts, and out / grads come back zigzag (``full_tensor()`` is the natural order). The ring
takes zigzag inputs whenever they come (the override reads StridedShards natively); ``load_balance=True``
(or "zigzag") also asks causal Shard(2) or Replicate inputs to become zigzag (an all-gather for Shard(2):
place them zigzag up front instead).

Load balancing (striped, Brandon et al. 2023): token t on rank t mod n, the placement
``striped_placement(2, T, n)`` = ``StridedShard(2, T // n)`` (the sequence read as (T/n, n), its n-wide
inner factor split one token per rank); it needs n | T (a clear error otherwise: pad, or use zigzag). Local
row a of rank i is token a*n + i, so q row a of rank i sees kv row b of rank j iff b <= a (j <= i) or b < a
(j > i): every step is one causal block, the kernel's own diagonal (j <= i) or the same diagonal one row
down (q rows 1.., kv rows ..L-1; j > i). Every rank computes n near-halves of a block per pass: work
differs across ranks by at most (n-1)·T/n scores, T/n per shifted diagonal (zigzag: exactly equal), with one
kernel call per step.

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

from dtensor_plus import strided, traced_collectives
from dtensor_plus.declared import RingShift
from dtensor_plus.kernels import flash_attention, switch
from dtensor_plus.placements import Placement, Replicate, Shard, StridedShard, chunk_bounds
from dtensor_plus.rules import OpSchema, Sharding

from .attention import cpu_flash_backward_rule, cpu_flash_rule
from .common import aten

__all__ = ["ring_rules", "RingGeometry", "ZIGZAG", "striped_placement", "LOAD_BALANCERS"]

SEQ = 2  # the sequence dim of q, k, v, out, grad_out and logsumexp
ZIGZAG = StridedShard(SEQ, 1, zigzag=True)  # the load-balanced placement of all of them on the ring's mesh dim
LOAD_BALANCERS = ("zigzag", "striped")  # what context_parallel(load_balance=...) names; True means "zigzag"
FULL, DIAGONAL, SKIP = "full", "diagonal", "skip"
_KV_TAG, _GRAD_TAG = 0, 2  # p2p tags of the two shifts that can be in flight at once (k, v and dk, dv)
_FORWARD = aten._scaled_dot_product_flash_attention_for_cpu.default
_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def striped_placement(dim: int, length: int, ring_size: int) -> StridedShard:
    """Striped attention's placement of a ``length``-long dim ``dim`` on a ring of ``ring_size`` ranks: token t
    on rank t mod ring_size (``StridedShard(dim, length // ring_size)``). Raises unless ring_size divides it."""
    if length % ring_size or length == 0:
        raise ValueError(f"striped load balance needs the sequence length ({length}) to be a positive multiple of "
                         f"the ring's {ring_size} ranks; pad the sequence to a multiple of {ring_size}, or use "
                         f"load_balance='zigzag' (any length)")
    return StridedShard(dim, length // ring_size)


def _is_striped(placement: Placement, length: int, ring_size: int) -> bool:
    return (placement.is_strided_shard() and placement.dim == SEQ and not placement.zigzag
            and placement.outer * ring_size == length)


def ring_rules(mesh_dim: int | str, load_balance: bool | str = False) -> dict:
    """The rules ``context_parallel(kind="ring")`` installs: {aten op: rule} for the CPU SDPA kernels. They
    read StridedShard inputs themselves (install them with ``override_rule(..., strided="native")``).
    ``load_balance``: False, True (= "zigzag"), "zigzag" or "striped"."""
    load_balance = _load_balancer(load_balance)
    return {
        _FORWARD: functools.partial(_forward_rule, mesh_dim=mesh_dim, load_balance=load_balance),
        _BACKWARD: functools.partial(_backward_rule, mesh_dim=mesh_dim, load_balance=load_balance),
    }


def _load_balancer(load_balance: bool | str) -> str | None:
    if load_balance is False:
        return None
    if load_balance is True:
        return "zigzag"
    if load_balance not in LOAD_BALANCERS:
        raise ValueError(f"context_parallel(load_balance={load_balance!r}): use False, True (zigzag) or one of "
                         f"{LOAD_BALANCERS}")
    return load_balance


# -- geometry: which pieces each rank holds, and which (q piece, kv piece) pairs are computed -----------------


@dataclass(frozen=True)
class RingGeometry:
    """Global metadata of one ring attention call: everything a rank needs to know about the others' blocks.

    The sequence is cut into ``num_pieces`` torch.chunk pieces: n (rank r holds piece r) or, zigzag, 2n
    (rank r holds pieces r and 2n-1-r, in that order). Striped: rank r holds tokens r, r+n, r+2n... (n | seq:
    every rank T/n of them, so the lengths are the plain pieces')."""

    mesh: object
    mesh_dim: int
    seq_q: int
    seq_kv: int
    causal: bool
    zigzag: bool = False
    striped: bool = False

    @property
    def size(self) -> int:
        return self.mesh.size(self.mesh_dim)

    @property
    def index(self) -> int:
        return self.mesh.get_local_rank(self.mesh_dim)

    @property
    def num_pieces(self) -> int:
        return 2 * self.size if self.zigzag else self.size

    def pieces_of(self, rank: int) -> list[int]:
        return [rank, 2 * self.size - 1 - rank] if self.zigzag else [rank]

    def kv_block_at(self, step: int) -> int:
        """The rank whose kv block this rank holds at ``step`` (it came ``step`` hops from its owner)."""
        return (self.index - step) % self.size

    def kv_length(self, rank: int) -> int:
        return sum(chunk_bounds(self.seq_kv, self.num_pieces, piece)[1] for piece in self.pieces_of(rank))

    def kind(self, q_piece: int, kv_piece: int) -> str:
        if chunk_bounds(self.seq_q, self.num_pieces, q_piece)[1] == 0 or chunk_bounds(self.seq_kv, self.num_pieces, kv_piece)[1] == 0:
            return SKIP
        if not self.causal or kv_piece < q_piece:
            return FULL
        return DIAGONAL if kv_piece == q_piece else SKIP

    def piece_pairs(self, step: int, rank: int | None = None) -> list[tuple[slice, slice, str]]:
        """The (q piece, kv piece) pairs ``rank`` (default: this one) computes at ``step``: (q rows, kv rows,
        kind), rows in the local blocks' own order; skipped pairs left out."""
        rank = self.index if rank is None else rank
        if self.striped:
            return self._striped_pairs(rank, (rank - step) % self.size)
        q_rows = self.local_rows(self.seq_q, rank)
        kv_rows = self.local_rows(self.seq_kv, (rank - step) % self.size)
        return [(q_slice, kv_slice, kind)
                for q_piece, q_slice in q_rows
                for kv_piece, kv_slice in kv_rows
                if (kind := self.kind(q_piece, kv_piece)) != SKIP]

    def _striped_pairs(self, q_rank: int, kv_rank: int) -> list[tuple[slice, slice, str]]:
        """Striped: q row a (token a*n + q_rank) sees kv row b (token b*n + kv_rank) iff b <= a when
        kv_rank <= q_rank, else b < a: the kernel's causal diagonal, or the same one row further down."""
        length = self.seq_q // self.size
        if not self.causal:
            return [(slice(0, length), slice(0, length), FULL)]
        if kv_rank <= q_rank:
            return [(slice(0, length), slice(0, length), DIAGONAL)]
        return [(slice(1, length), slice(0, length - 1), DIAGONAL)] if length > 1 else []

    def pairs(self, step: int, rank: int | None = None) -> list[tuple[slice, slice, str]]:
        """``piece_pairs`` as the kernel runs them: two full pairs that share one side and meet on the other
        are one block (zigzag: one kernel call per step after the first)."""
        return _coalesced(self.piece_pairs(step, rank))

    def local_rows(self, seq: int, rank: int) -> list[tuple[int, slice]]:
        """(global piece, rows in the local block) of the pieces ``rank`` holds of a ``seq``-long dim."""
        rows, start = [], 0
        for piece in self.pieces_of(rank):
            length = chunk_bounds(seq, self.num_pieces, piece)[1]
            rows.append((piece, slice(start, start + length)))
            start += length
        return rows


def _coalesced(pairs: list) -> list:
    """``pairs`` with any two FULL ones of equal q rows and adjacent kv rows (or the reverse) made one."""
    for i, (q_a, kv_a, kind_a) in enumerate(pairs):
        for j, (q_b, kv_b, kind_b) in enumerate(pairs):
            if i == j or kind_a != FULL or kind_b != FULL:
                continue
            if q_a == q_b and kv_a.stop == kv_b.start:
                joined = (q_a, slice(kv_a.start, kv_b.stop), FULL)
            elif kv_a == kv_b and q_a.stop == q_b.start:
                joined = (slice(q_a.start, q_b.stop), kv_a, FULL)
            else:
                continue
            rest = [p for k, p in enumerate(pairs) if k not in (i, j)]
            return _coalesced(rest + [joined])
    return pairs


def _local_pairs(ring: RingGeometry, step: int, query, kv) -> list:
    """The step's pairs, or none where another mesh dim left this rank no batch rows or heads: the CPU kernel
    divides by zero on an empty head dim. Only the compute is skipped; the ring's shifts never depend on it."""
    if min(query.numel(), kv[0].numel(), kv[1].numel()) == 0:
        return []
    return ring.pairs(step)


def _rows(t: torch.Tensor, rows: slice) -> torch.Tensor:
    return t.narrow(SEQ, rows.start, rows.stop - rows.start)


def _with_length(t: torch.Tensor, length: int) -> torch.Size:
    shape = list(t.shape)
    shape[SEQ] = length
    return torch.Size(shape)


def _shift(comm, tensors, ring: RingGeometry, step: int, tag: int):
    """Start passing the blocks held at ``step`` on (the rule's declared ring shift); what arrives is block
    kv_block_at(step + 1)."""
    length = ring.kv_length(ring.kv_block_at(step + 1))
    return comm.ring_shift(tensors, ring.mesh_dim, recv_shapes=[_with_length(t, length) for t in tensors], tag=tag,
                           async_op=True)


# -- forward ------------------------------------------------------------------------------------------------


def ring_forward(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None, ring: RingGeometry,
                 comm):
    """This rank's (out, logsumexp) for its q block, from every kv block passed around the ring."""
    _check_local_call(dropout_p, attn_mask)
    # Strict RNG mode changes nothing here: at dropout_p == 0 the kernel draws nothing, so the dispatcher hands
    # it local blocks like any other op (random.draws).
    kv, out, lse = [key, value], None, None  # out, lse: this rank's whole q block, merged so far
    for step in range(ring.size):
        pending = _shift(comm, kv, ring, step, _KV_TAG) if step < ring.size - 1 else None  # overlaps the kernel
        for q_rows, kv_rows, kind in _local_pairs(ring, step, query, kv):
            out_b, lse_b = _block_forward(_rows(query, q_rows), _rows(kv[0], kv_rows), _rows(kv[1], kv_rows),
                                          kind == DIAGONAL, scale)
            if out is None:  # rows not reached yet hold lse -inf: the first merge into them copies the block
                lse = torch.full(query.shape[:SEQ + 1], -torch.inf, dtype=torch.promote_types(lse_b.dtype, torch.float32),
                                 device=query.device)
                out = lse.new_zeros(lse.shape + value.shape[-1:])
            out_m, lse_m = _merge(_rows(out, q_rows), _rows(lse, q_rows), out_b, lse_b)
            _rows(out, q_rows).copy_(out_m)
            _rows(lse, q_rows).copy_(lse_m)
        if pending is not None:
            kv = pending.wait()
    if out is None:  # an empty q block, or no heads or batch rows here: nothing was computed
        out, lse = _empty_outputs(query, key, value, is_causal, scale)
        return _reading(out, kv), lse
    return _reading(out.to(query.dtype), kv), lse


def _reading(t: torch.Tensor, received: list) -> torch.Tensor:
    """``t``; under torch.compile, ``t`` joined with none of the elements of the last blocks received, so the
    graph reads them. A rank whose blocks above the causal diagonal are skipped never reads the last k/v block
    it receives; AOTAutograd's partitioner would then drop that shift from its graph (it assumes every rank runs
    the same graph), and with it the send the next rank waits for. Eager runs every shift: ``t`` itself."""
    if not traced_collectives.is_traced(t):
        return t
    return torch.cat([t.reshape(-1)] + [r.reshape(-1)[:0] for r in received]).view(t.shape)


def _block_forward(query, key, value, causal: bool, scale):
    """One block pair's (out, lse): the Triton flash kernel where use_kernels allows, else aten's CPU kernel."""
    if switch.want_kernel("flash_attention", query):
        return flash_attention.flash_block_forward(query, key, value, causal, scale)
    return _FORWARD(query, key, value, 0.0, causal, scale=scale)


def _block_backward(grad_out, query, key, value, out, lse, causal: bool, scale):
    if switch.want_kernel("flash_attention", query):
        return flash_attention.flash_block_backward(grad_out, query, key, value, out, lse, causal, scale)
    return _BACKWARD(grad_out, query, key, value, out, lse, 0.0, causal, scale=scale)


def _merge(out, lse, out_b, lse_b):
    """Exact softmax merge of two partial results over disjoint kv blocks. Every computed block has at least
    one visible key per row (full blocks are non-empty; a causal diagonal row sees its own key), so lse_b is
    finite; lse may be -inf (nothing merged yet), which gives exactly (out_b, lse_b)."""
    lse_b = lse_b.to(torch.promote_types(lse_b.dtype, torch.float32))
    out_b = out_b.to(lse_b.dtype)
    merged = torch.logaddexp(lse, lse_b)
    out = out * (lse - merged).exp().unsqueeze(-1) + out_b * (lse_b - merged).exp().unsqueeze(-1)
    return out, merged


def _empty_outputs(query, key, value, is_causal, scale):
    metas = _FORWARD(*(t.to("meta") for t in (query, key, value)), 0.0, is_causal, scale=scale)
    return tuple(torch.zeros(m.shape, dtype=m.dtype, device=query.device) for m in metas)


# -- backward -----------------------------------------------------------------------------------------------


def ring_backward(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *, attn_mask=None,
                  scale=None, ring: RingGeometry, comm):
    """This rank's (dq, dk, dv): dq of its q block; dk, dv of its kv block, gathered from every rank's share."""
    _check_local_call(dropout_p, attn_mask)
    acc_dtype = torch.promote_types(query.dtype, torch.float32)
    grad_q = torch.zeros(query.shape, dtype=acc_dtype, device=query.device)
    kv, own, traveling, pending_kv = [key, value], None, None, None
    for step in range(ring.size):
        if step < ring.size - 1:
            pending_kv = _shift(comm, kv, ring, step, _KV_TAG)  # overlaps the kernel
        share = _backward_step(grad_out, query, kv, out, logsumexp, grad_q, scale, _local_pairs(ring, step, query, kv))
        if step == 0:
            own = share  # this rank's share of its own block: it stays here
        else:  # block (r - step)'s accumulator: started at step 1 on the rank after its owner, arrives home last
            if traveling is not None:
                received = traveling.wait()
                share = [a + b for a, b in zip(received, share)]
            traveling = _shift(comm, share, ring, step, _GRAD_TAG)
        if step < ring.size - 1:
            kv = pending_kv.wait()
    grad_k, grad_v = (a + b for a, b in zip(own, traveling.wait()))
    return _reading(grad_q.to(query.dtype), kv), grad_k.to(key.dtype), grad_v.to(value.dtype)


def _backward_step(grad_out, query, kv, out, logsumexp, grad_q, scale, pairs) -> list[torch.Tensor]:
    """Add this step's pairs' dq into ``grad_q`` (in place); return their (dk, dv) share of the kv block held."""
    share = [torch.zeros(t.shape, dtype=grad_q.dtype, device=t.device) for t in kv]
    for q_rows, kv_rows, kind in pairs:
        grad_q_b, *grad_kv_b = _block_backward(_rows(grad_out, q_rows), _rows(query, q_rows), _rows(kv[0], kv_rows),
                                               _rows(kv[1], kv_rows), _rows(out, q_rows), _rows(logsumexp, q_rows),
                                               kind == DIAGONAL, scale)
        _rows(grad_q, q_rows).add_(grad_q_b)
        for total, part in zip(share, grad_kv_b):
            _rows(total, kv_rows).add_(part)
    return share


def _check_local_call(dropout_p, attn_mask) -> None:
    # The rule sends these calls elsewhere; dropout is a float (never part of a rule's decision), so check here.
    assert attn_mask is None, "ring attention takes no attn_mask (the rule keeps the default for masks)"
    if dropout_p != 0.0:
        raise ValueError(f"ring attention runs the fused kernel without dropout, got dropout_p={dropout_p}; "
                         f"use dropout_p=0 inside context_parallel (torch decomposes dropout before it reaches us)")


# -- rules --------------------------------------------------------------------------------------------------


def _causal(op: OpSchema) -> bool:
    return bool(op.arg("is_causal", False))


def _ring_placement(op: OpSchema, index: int, load_balance: str | None) -> Placement | None:
    """The placement the ring runs q, k, v on (Shard(seq), ZIGZAG or striped), or None when this call keeps
    the default rule. A decision from global metadata only."""
    query, key, value = op.arg("query"), op.arg("key"), op.arg("value")
    n = op.mesh.size(index)
    if n == 1 or op.arg("attn_mask") is not None or any(t.ndim != 4 for t in (query, key, value)):
        return None
    seq_q, seq_kv = query.shape[SEQ], key.shape[SEQ]
    placed = {t.placements[index] for t in (query, key, value)}
    striped = len(placed) == 1 and seq_q == seq_kv and _is_striped(next(iter(placed)), seq_q, n)
    if placed not in ({Shard(SEQ)}, {ZIGZAG}) and not striped:
        return None
    causal = _causal(op)
    if seq_q == 0 or seq_kv == 0 or (causal and seq_q != seq_kv):
        return None
    if load_balance is None or not causal:
        return placed.pop()
    return ZIGZAG if load_balance == "zigzag" else striped_placement(SEQ, seq_q, n)


def _on_ring(placements: tuple[Placement, ...], index: int, placement: Placement):
    return placements[:index] + (placement,) + placements[index + 1:]


def _seen_by_default(op: OpSchema, index: int, placement: Placement) -> OpSchema:
    """``op`` as the default attention rule may read it: the ring's own placement (ZIGZAG or striped) on its
    mesh dim read as Shard(seq) (only that mesh dim changes afterwards), any other StridedShard gathered."""
    def plain(k, p):
        if p.is_strided_shard():
            return Shard(SEQ) if (k, p) == (index, placement) else Replicate()
        return p
    specs = [spec.with_placements(tuple(plain(k, p) for k, p in enumerate(spec.placements))) for spec in op.specs]
    return strided.with_specs(op, specs)


def _rule(op: OpSchema, mesh_dim, load_balance: str | None, default_rule, local_op, shifts_per_hop: int) -> Sharding:
    """The ring's decision; the local op shifts ``shifts_per_hop`` block sets per hop of the ring (n-1 hops)."""
    index = op.mesh.mesh_dim_index(mesh_dim)  # raises ValueError naming the mesh's dims
    placement = _ring_placement(op, index, load_balance)
    if placement is None:  # the default rule, which never sees a StridedShard (it gathers them)
        return strided.gathered(default_rule, op) if strided.has_strided(op.specs) else default_rule(op)
    default = default_rule(_seen_by_default(op, index, placement))
    query, key = op.arg("query"), op.arg("key")
    ring = RingGeometry(op.mesh, index, query.shape[SEQ], key.shape[SEQ], _causal(op), placement == ZIGZAG,
                        placement.is_strided_shard() and placement != ZIGZAG)
    return Sharding(inputs=tuple(_on_ring(p, index, placement) for p in default.inputs_for(op)),
                    outputs=tuple(_on_ring(p, index, placement) for p in default.outputs),
                    local_op=functools.partial(local_op, ring=ring),
                    communication=(RingShift(index, shifts_per_hop * (ring.size - 1)),))


def _forward_rule(op: OpSchema, *, mesh_dim, load_balance: str | None = None) -> Sharding:
    """(query, key, value, dropout_p, is_causal, *, attn_mask, scale) -> (output, logsumexp)."""
    return _rule(op, mesh_dim, load_balance, cpu_flash_rule, ring_forward, 1)  # k, v


def _backward_rule(op: OpSchema, *, mesh_dim, load_balance: str | None = None) -> Sharding:
    """(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask, scale) -> grads."""
    return _rule(op, mesh_dim, load_balance, cpu_flash_backward_rule, ring_backward, 2)  # k, v and dk, dv

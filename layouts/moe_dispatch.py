"""Dispatch and combine for mixture-of-experts: tokens travel to their experts' ranks and back on the ``ep``
mesh dim, by all-to-alls with variable split sizes (nothing padded to a capacity).

This file owns the movement of local token rows. ``dispatch_combine`` takes this rank's tokens, their routing
and a function that runs this rank's experts on rows grouped by expert, and returns the weighted sum of each
token's expert outputs:

1. flatten the (token, slot) assignments, drop the ones a full expert refused, and stably sort them by expert
   (rows of one expert become contiguous; ties keep token order);
2. count rows per expert and exchange the counts (an all-to-all of E ints), so every rank knows what it
   receives from each peer (in a simulated world, which has no values, the counts are the routing it assumes:
   ``dtensor_plus.simulate.SimulatedWorld.expert_counts``; the exchange is issued all the same);
3. all-to-all the rows with those split sizes; rows arrive ordered by (source rank, expert), and a local
   permutation makes each local expert's rows contiguous (ordered by (expert, source rank));
4. run the experts (grouped GEMM), undo the permutation, all-to-all back with the splits swapped;
5. scale each row by its gate and add it into its token (``index_add``).

With ``chunks > 1``, steps 3-4 run in pipelined chunks (moe_pipelined.py). With the experts sharded over two
mesh dims (nodes x ranks per node), steps 2-4 run as two hops, inside the node then between nodes
(moe_hierarchical.py).

Backward runs through all of it: the row all-to-alls are ``AllToAllSplits`` (backward: the inverse
all-to-all), the permutations are gathers. With no ep mesh dim (one device, or experts replicated) steps 2-4
skip the communication.

Legend: N local tokens, D width, K top-k slots, A kept assignments on this rank, R rows received, E experts,
L local experts (E / ep).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dtensor_plus.collectives import AllToAllSplits, all_to_all_splits
from dtensor_plus.renamed import renamed_keywords
from dtensor_plus.simulate import current_world

from .moe_hierarchical import exchange_hierarchical
from .moe_pipelined import exchange_pipelined

__all__ = ["dispatch_combine"]


@renamed_keywords(ep_dim="ep_mesh_dim")
def dispatch_combine(x_ND: torch.Tensor, expert_idx_NK: torch.Tensor, gates_NK: torch.Tensor,
                     keep_NK: torch.Tensor | None, num_experts: int,
                     experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     mesh=None, ep_mesh_dim: int | tuple[int, int] | None = None, chunks: int = 1,
                     priority=None) -> torch.Tensor:
    """``y[n] = sum_k gates[n, k] * expert_{idx[n, k]}(x[n])`` over the kept assignments, as (N, D).

    Args:
        x_ND, expert_idx_NK, gates_NK, keep_NK: this rank's tokens and their routing (local tensors).
        num_experts: E, over all ranks.
        experts: ``experts(rows_RD, counts_L)`` runs this rank's L experts on rows grouped by local expert.
        mesh, ep_mesh_dim: the mesh and the mesh dim the experts are sharded on (local rank r owns experts
            r L .. (r + 1) L - 1); None when this rank holds all experts. A pair (inter, intra) of mesh dims:
            the experts sharded over both (ep rank i G + j at (i, j)), dispatched hierarchically.
        chunks: 1 for one all-to-all each way; more to pipeline the all-to-alls with expert compute in that
            many chunks (moe_pipelined.py).
        priority: Lina's scheduler (moe_priority.AllToAllFirst): the gradient all-reduce pieces go in the gaps
            between the backward all-to-alls (the exchange then runs as moe_pipelined's, in ``chunks`` >= 1).
    """
    if chunks < 1:
        raise ValueError(f"dispatch_combine: chunks must be >= 1 (1: no pipelining), got {chunks}")
    N, K = expert_idx_NK.shape
    token_A = torch.arange(N, device=x_ND.device).repeat_interleave(K)
    expert_A, gate_A = expert_idx_NK.reshape(-1), gates_NK.reshape(-1)
    if keep_NK is not None:
        kept = keep_NK.reshape(-1)
        token_A, expert_A, gate_A = token_A[kept], expert_A[kept], gate_A[kept]
    order_A = torch.argsort(expert_A, stable=True)
    token_A, gate_A = token_A[order_A], gate_A[order_A]
    counts_E = torch.bincount(expert_A, minlength=num_experts)
    rows_AD = x_ND[token_A]
    hierarchical = isinstance(ep_mesh_dim, tuple)
    if hierarchical and (current_world() is not None or chunks > 1 or priority is not None):
        raise ValueError("dispatch_combine: the hierarchical (two-mesh-dim) dispatch runs on real ranks in one chunk "
                         "without Lina's priority; use chunks=1 and priority=None, or one ep mesh dim to pipeline, "
                         "prioritise or simulate")
    if mesh is None or ep_mesh_dim is None or _ep_size(mesh, ep_mesh_dim) == 1:
        simulated = current_world()
        out_AD = experts(rows_AD, counts_E if simulated is None else  # a simulated world has no routing values
                         simulated.expert_counts(0, 1, rows_AD.shape[0], num_experts))
    elif hierarchical:
        out_AD = exchange_hierarchical(
            rows_AD, counts_E, lambda rows, counts_nL: _through_local_experts(rows, counts_nL, counts_nL.sum(0), experts),
            mesh, *ep_mesh_dim)
    elif chunks == 1 and priority is None:
        out_AD = _exchange(rows_AD, counts_E, experts, mesh, ep_mesh_dim)
    else:
        if current_world() is not None:
            raise ValueError("dispatch_combine: pipelined chunks (chunks > 1) are not modelled in a simulated "
                             "world; simulate with chunks=1 (MoE(dispatch_chunks=1)), the same bytes")
        out_AD = exchange_pipelined(
            rows_AD, counts_E, lambda rows, counts_nL: _through_local_experts(rows, counts_nL, counts_nL.sum(0), experts),
            mesh, ep_mesh_dim, chunks, priority)
    return x_ND.new_zeros(x_ND.shape).index_add(0, token_A, out_AD * gate_A.unsqueeze(-1))


def _ep_size(mesh, ep_mesh_dim) -> int:
    dims = ep_mesh_dim if isinstance(ep_mesh_dim, tuple) else (ep_mesh_dim,)
    return math.prod(mesh.size(d) for d in dims)


def _exchange(rows_AD, counts_E, experts, mesh, ep_mesh_dim: int) -> torch.Tensor:
    """Rows (grouped by expert) to their experts' ranks, through ``experts``, and back in the same order."""
    n = mesh.size(ep_mesh_dim)
    L = counts_E.numel() // n
    recv_counts_nL = all_to_all_splits(counts_E, mesh, ep_mesh_dim, [L] * n, [L] * n).view(n, L)
    simulated = current_world()
    if simulated is None:
        # NOTE: .tolist() is a device-to-host sync: c10d needs the split sizes on the host.
        send_splits = counts_E.view(n, L).sum(1).tolist()
        recv_splits = recv_counts_nL.sum(1).tolist()
        counts_L = recv_counts_nL.sum(0)
    else:  # the counts are values a simulated world does not have: the routing it assumes gives them
        send_splits, recv_splits, counts_L = _assumed_splits(simulated, rows_AD.shape[0], counts_E.numel(), mesh,
                                                             ep_mesh_dim)
    recv_RD = AllToAllSplits.apply(rows_AD, mesh, ep_mesh_dim, send_splits, recv_splits)  # by (source, expert)
    back_RD = _through_local_experts(recv_RD, recv_counts_nL, counts_L, experts)
    return AllToAllSplits.apply(back_RD, mesh, ep_mesh_dim, recv_splits, send_splits)


def _through_local_experts(recv_RD, recv_counts_nL, counts_L, experts) -> torch.Tensor:
    """Rows received ordered by (source rank, expert), ``recv_counts_nL`` of each, through this rank's experts
    (which want them by (expert, source): a local permutation) and back in the order they came."""
    n, L = recv_counts_nL.shape
    local_expert_R = torch.arange(L, device=recv_RD.device).repeat(n).repeat_interleave(
        recv_counts_nL.reshape(-1), output_size=recv_RD.shape[0])
    perm_R = torch.argsort(local_expert_R, stable=True)  # by (expert, source)
    out_RD = experts(recv_RD[perm_R], counts_L)
    return out_RD[torch.argsort(perm_R)]  # the inverse permutation: back to (source, expert) order


def _assumed_splits(world, assignments: int, num_experts: int, mesh, ep_mesh_dim: int):
    """(send splits, receive splits, rows per local expert) in a simulated world, from the routing it assumes
    (``SimulatedWorld.expert_counts``) for every ep rank, each routing as many assignments as this one."""
    n, me = mesh.size(ep_mesh_dim), mesh.get_local_rank(ep_mesh_dim)
    L = num_experts // n
    counts = [world.expert_counts(source, n, assignments, num_experts) for source in range(n)]
    send_splits = [sum(counts[me][j * L:(j + 1) * L]) for j in range(n)]
    mine_nL = [c[me * L:(me + 1) * L] for c in counts]  # what each source sends my experts
    return send_splits, [sum(row) for row in mine_nL], [sum(col) for col in zip(*mine_nL)]

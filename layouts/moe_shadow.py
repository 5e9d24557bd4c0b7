"""FasterMoE's shadow experts: a popular expert is broadcast to every ep rank and run there on that rank's own
tokens, instead of every rank sending it tokens; its gradient is summed back onto the rank that owns it.

``MoE.shadowed`` names the experts (by id) to shadow for the coming steps; ``moe_balance.experts_to_shadow``
picks the ones whose tokens would move more bytes than the expert itself. Nothing persistent moves: the
owner keeps the weights and their optimizer state, so shadowing can change from one step to the next.

Per shadowed expert and step: forward, one ``broadcast`` of each of its weights from its owner on the ep mesh
dim; backward, one ``reduce`` (sum) of each weight's gradient onto the owner (FasterMoE's "shadow" then
"reduce"). The assignments of shadowed experts are left out of the all-to-all and computed locally (the same
grouped GEMM over the shadows), so the busiest rank no longer does the hot expert's work for every rank.

Legend: N local tokens, K top-k, E experts, L experts per ep rank, S shadowed experts, X an expert weight's
trailing dims.
"""

from __future__ import annotations

from typing import Callable

import torch

from dtensor_plus.collectives import broadcast, reduce

from .moe_dispatch import dispatch_combine

__all__ = ["shadow_weights", "dispatch_with_shadows"]


class _ShadowCopy(torch.autograd.Function):
    """forward: the owner's expert weight on every rank of the ep mesh dim (broadcast) / backward: the ranks'
    gradients summed onto the owner (reduce); the other ranks' own rows get no gradient from it."""

    @staticmethod
    def forward(ctx, row_X, mesh, mesh_dim, owner):
        ctx.mesh, ctx.mesh_dim, ctx.owner = mesh, mesh_dim, owner
        ctx.is_owner = mesh.get_local_rank(mesh_dim) == owner
        copy = row_X.clone(memory_format=torch.contiguous_format) if ctx.is_owner else torch.empty_like(
            row_X, memory_format=torch.contiguous_format)
        return broadcast(copy, mesh, mesh_dim, owner)

    @staticmethod
    def backward(ctx, grad_X):
        summed = reduce(grad_X.contiguous(), ctx.mesh, ctx.mesh_dim, ctx.owner)
        return (summed if ctx.is_owner else None), None, None, None


def shadow_weights(w_local_LX: torch.Tensor, slots: list[int], mesh, ep_mesh_dim: int) -> torch.Tensor:
    """(S, X): the weights at rows ``slots`` of the global expert dim, on every ep rank (differentiable)."""
    L = w_local_LX.shape[0]
    return torch.stack([_ShadowCopy.apply(w_local_LX[s % L], mesh, ep_mesh_dim, s // L) for s in slots])


def dispatch_with_shadows(x_ND: torch.Tensor, expert_idx_NK: torch.Tensor, gates_NK: torch.Tensor,
                          keep_NK: torch.Tensor | None, slot_E: torch.Tensor, shadowed: tuple[int, ...],
                          sent_experts: Callable, shadow_experts: Callable, mesh, ep_mesh_dim: int,
                          chunks: int = 1, priority=None) -> torch.Tensor:
    """``dispatch_combine`` with the assignments of the ``shadowed`` experts computed here.

    ``sent_experts(rows, counts_L)`` runs this rank's experts (rows that came by all-to-all);
    ``shadow_experts(rows, counts_S)`` runs the shadows, in the order of ``shadowed``; ``chunks`` pipelines the
    all-to-alls of the rest and ``priority`` schedules the gradient all-reduce around them (``dispatch_combine``).
    """
    E = slot_E.numel()
    is_shadow_E = torch.zeros(E, dtype=torch.bool, device=expert_idx_NK.device)
    is_shadow_E[list(shadowed)] = True
    shadow_index_E = torch.zeros(E, dtype=expert_idx_NK.dtype, device=expert_idx_NK.device)
    shadow_index_E[list(shadowed)] = torch.arange(len(shadowed), device=expert_idx_NK.device)
    here_NK = is_shadow_E[expert_idx_NK]
    keep_NK = torch.ones_like(here_NK) if keep_NK is None else keep_NK
    sent = dispatch_combine(x_ND, slot_E[expert_idx_NK], gates_NK, keep_NK & ~here_NK, E, sent_experts, mesh,
                            ep_mesh_dim, chunks, priority)
    local = dispatch_combine(x_ND, shadow_index_E[expert_idx_NK], gates_NK, keep_NK & here_NK, len(shadowed),
                             shadow_experts)
    return sent + local

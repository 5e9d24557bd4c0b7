"""Tutel's switch between expert-parallel and data-parallel experts at run time, without re-sharding weights.

The experts keep one layout, ``Shard(0)`` on the ep mesh dim(s): each weight and its optimizer state live on
their owner and never move. Each step runs either

* ``"ep"``, expert-parallel: tokens travel to their experts' ranks and back (moe_dispatch.py), or
* ``"dp"``, data-parallel over experts: every expert's weights are all-gathered on the ep mesh dims for this
  step only (a ``redistribute`` to Replicate there; backward: the gradients reduce-scattered onto the owners),
  and each rank runs its own tokens through all experts locally; no token moves.

``choose_mode`` picks the one in which the busiest rank sends fewer bytes, from the step's routing (Janus's
data-centric comparison, moe_balance.py). Tokens: with T kept assignments in the batch, rank r's experts
taking load_r of them, and each rank's tokens spread evenly over sources, rank r sends ``(T - load_r) / ep``
rows out and ``load_r (ep-1)/ep`` rows back, forward and again backward: ``2 (T + load_r (ep-2)) / ep`` rows of D,
most on the busiest rank (under even routing exactly ``moe_balance.token_moving_bytes``). Experts: every rank
sends ``2 (ep-1) L P`` (its L experts of P elements all-gathered, their gradients reduce-scattered;
``moe_balance.expert_moving_bytes``).
The load is global (summed over the batch by the router) and the placement replicated, so every rank makes the
same choice with no communication. Skewed routing piles tokens on one rank and tips it to ``"dp"``; small
batches favour ``"ep"`` for large experts and vice versa.

Legend: E experts, L experts per ep rank, P elements of one expert's weights, D width.
"""

from __future__ import annotations

import torch

from dtensor_plus import DTensor, Replicate

from .moe_balance import expert_moving_bytes, rank_load
from .moe_router import local_weight

__all__ = ["EXPERT_MODES", "choose_mode", "token_bytes", "gathered_experts"]

EXPERT_MODES = ("ep", "dp", "auto")


def choose_mode(load_E: torch.Tensor, slot_E: torch.Tensor, ep: int, dim: int, expert_params: int,
                element_bytes: int = 4) -> str:
    """``"dp"`` when the busiest rank sends fewer bytes gathering the experts than moving tokens, else ``"ep"``
    (ties: ``"ep"``, the layout the weights already have)."""
    if ep == 1:
        return "ep"
    return "dp" if expert_moving_bytes(load_E.numel() // ep, expert_params, ep, element_bytes) < token_bytes(
        load_E, slot_E, ep, dim, element_bytes) else "ep"


def token_bytes(load_E: torch.Tensor, slot_E: torch.Tensor, ep: int, dim: int, element_bytes: int = 4) -> float:
    """Bytes the busiest rank sends moving tokens for one layer's forward and backward: ``2 (T + max_r load_r
    (ep-2)) / ep`` rows of ``dim`` (the module doc)."""
    total = float(load_E.sum().item())
    busiest = rank_load(load_E, slot_E, ep).max().item()
    return 2 * (total + busiest * (ep - 2)) / ep * dim * element_bytes


def gathered_experts(w: DTensor, ep_mesh_dims: tuple[int, ...], token_placements) -> torch.Tensor:
    """All E experts of weight ``w`` on this rank, in slot order, for a computation on this rank's tokens (laid
    out ``token_placements``): all-gathered on ``ep_mesh_dims`` (differentiable: the gradient, Partial over the
    ranks' tokens, is reduce-scattered back onto each expert's owner). ``w`` itself does not change."""
    whole = [Replicate() if k in ep_mesh_dims else p for k, p in enumerate(w.placements)]
    return local_weight(w.redistribute(placements=whole), token_placements)

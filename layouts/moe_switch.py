"""Tutel's switch between expert-parallel and data-parallel experts at run time, without re-sharding weights.

The experts keep one layout, ``Shard(0)`` on the ep mesh dim(s): each weight and its optimizer state live on
their owner and never move. Each step runs either

* ``"ep"``, expert-parallel: tokens travel to their experts' ranks and back (moe_dispatch.py), or
* ``"dp"``, data-parallel over experts: every expert's weights are all-gathered on the ep mesh dims for this
  step only (a ``redistribute`` to Replicate there; backward: the gradients reduce-scattered onto the owners),
  and each rank runs its own tokens through all experts locally; no token moves.

``choose_mode`` picks the one that moves fewer bytes from the step's routing (Janus's data-centric
comparison, moe_balance.py): the busiest rank's tokens, ``4 max_r load_r (ep-1)/ep D`` elements (dispatch and
combine, forward and backward, from the other ranks assuming each rank's tokens spread evenly), against the
experts, ``2 (ep-1) L P`` (each rank's L experts of P elements all-gathered, their gradients reduce-scattered).
The load is global (summed over the batch by the router) and the placement replicated, so every rank makes the
same choice with no communication. Skewed routing piles tokens on one rank and tips it to ``"dp"``; small
batches favour ``"ep"`` for large experts and vice versa.

Legend: E experts, L experts per ep rank, P elements of one expert's weights, D width.
"""

from __future__ import annotations

import torch

from dtensor_plus import DTensor, Replicate

from .moe_balance import expert_moving_bytes, rank_load, token_moving_bytes
from .moe_router import local_weight

__all__ = ["EXPERT_MODES", "choose_mode", "gathered_experts"]

EXPERT_MODES = ("ep", "dp", "auto")


def choose_mode(load_E: torch.Tensor, slot_E: torch.Tensor, ep: int, dim: int, expert_params: int,
                element_bytes: int = 4) -> str:
    """``"dp"`` when gathering the experts moves fewer bytes than moving the busiest rank's tokens, else
    ``"ep"`` (ties: ``"ep"``, the layout the weights already have)."""
    if ep == 1:
        return "ep"
    busiest = int(rank_load(load_E, slot_E, ep).max().item())
    tokens = token_moving_bytes(busiest, 1, dim, ep, element_bytes)
    experts = expert_moving_bytes(load_E.numel() // ep, expert_params, ep, element_bytes)
    return "dp" if experts < tokens else "ep"


def gathered_experts(w: DTensor, ep_mesh_dims: tuple[int, ...], token_placements) -> torch.Tensor:
    """All E experts of weight ``w`` on this rank, in slot order, for a computation on this rank's tokens (laid
    out ``token_placements``): all-gathered on ``ep_mesh_dims`` (differentiable: the gradient, Partial over the
    ranks' tokens, is reduce-scattered back onto each expert's owner). ``w`` itself does not change."""
    whole = [Replicate() if k in ep_mesh_dims else p for k, p in enumerate(w.placements)]
    return local_weight(w.redistribute(placements=whole), token_placements)

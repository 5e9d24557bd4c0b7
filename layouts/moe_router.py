"""The mixture-of-experts router: which experts each token goes to, with what weight, which assignments a full
expert drops, and the router's two auxiliary losses, all equal to what one device computes on the whole batch.

This file owns routing decisions and their global statistics. Tokens arrive as (B, T, D), a plain tensor or a
DTensor whose batch dim is ``Shard(0)`` on some mesh dims ("batch dims") and ``Replicate`` elsewhere. Every
global quantity is built from local pieces wrapped as DTensors (``Partial`` on the batch dims), so the
library inserts (and differentiates) the reductions; on plain tensors the same code runs without them.

* top-k: softmax over all experts, then the k largest by a *stable* descending sort, so exact ties go to the
  lowest expert index on every layout (``torch.topk`` does not promise an order among ties);
* jitter (Switch Transformer): the router input is multiplied by U(1 - eps, 1 + eps) in training, drawn with
  ``torch.rand_like`` on the (D)Tensor, so under ``dtensor_plus.manual_seed(s, strict=True)`` each shard draws
  its slice of the single-device draw;
* capacity (GShard): expert e accepts ``ceil(capacity_factor * N * k / E)`` assignments of the N tokens of
  the global batch, in the order (slot, global token index): every first choice before any second choice,
  earlier tokens first. Every rank computes the positions on the all-gathered (N, k) expert indices (8 bytes
  per assignment, against 4 D bytes for the token itself), with the same function one device uses;
* load-balancing loss (Switch/GShard): ``E * sum_e f_e * P_e``, f_e the fraction of the N k assignments
  chosen for e (before dropping), P_e the mean router probability of e; 1.0 when perfectly balanced;
* z-loss (ST-MoE): mean over tokens of ``logsumexp(logits)^2``;
* auxiliary-loss-free balancing (DeepSeek-V3, ``balance_rate``): a per-expert bias, a buffer (not trained by
  gradients), is added to the probabilities for the top-k *selection only*; the gates stay the unbiased
  probabilities. After each optimizer step ``update_balance_bias`` moves each expert's bias by ``balance_rate``
  towards balance (up when its load is under the mean, down when over: the sign of the load error). The load
  is global, so every rank makes the same update and the bias stays Replicate.

Legend: B batch, T sequence, D width, N tokens (B T), E experts, K top-k slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Partial, Replicate, Shard

__all__ = ["TopKRouter", "Routing", "stable_topk", "capacity_keep", "expert_capacity", "local_weight"]


@dataclass
class Routing:
    """One routing of this rank's tokens (local tensors; N = this rank's B T).

    expert_idx_NK: chosen experts, best first. gates_NK: their weights (differentiable). keep_NK: False where
    a full expert dropped the assignment (None in dropless mode). aux_loss, z_loss: global scalars (a DTensor
    on a mesh). load_E: assignments each expert processes, over the global batch (after dropping).
    row_placements: on a mesh, how the routed (B, T) rows lie (Shard(0) on the batch dims); None otherwise.
    mesh, batch_shape: on a mesh, the tokens' mesh and their global (B, T); None otherwise.
    """

    expert_idx_NK: torch.Tensor
    gates_NK: torch.Tensor
    keep_NK: torch.Tensor | None
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    load_E: torch.Tensor
    row_placements: tuple | None = None
    mesh: object = None
    batch_shape: tuple | None = None
    chosen_E: torch.Tensor | None = None

    def whole_expert_idx(self) -> torch.Tensor:
        """The chosen experts of every token of the global batch, (B T, K) in batch order, best first: the
        decisions one device makes, e.g. to count those two runs disagree on. NOTE: on a mesh this is an
        all-gather (8 bytes per assignment) that every rank must run."""
        if self.mesh is None:
            return self.expert_idx_NK
        (B, T), K = self.batch_shape, self.expert_idx_NK.shape[-1]
        local_BTK = self.expert_idx_NK.reshape(-1, T, K)
        whole_BTK = DTensor.from_local(local_BTK, self.mesh, self.row_placements, shape=(B, T, K)).full_tensor()
        return whole_BTK.reshape(-1, K)


def stable_topk(scores_NE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest scores per row; exact ties go to the lowest index."""
    indices_NK = torch.sort(scores_NE, dim=-1, descending=True, stable=True).indices[:, :k]
    return scores_NE.gather(1, indices_NK), indices_NK


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Assignments one expert accepts: ``ceil(capacity_factor * N * k / E)`` over the global batch."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def capacity_keep(expert_idx_NK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """(N, K) bool: True where the assignment fits its expert's ``capacity``, filling each expert in the order
    (slot, token index) (GShard: all first choices take precedence over second choices)."""
    onehot_KNE = F.one_hot(expert_idx_NK.t(), num_experts)
    K, N, E = onehot_KNE.shape
    position_KNE = onehot_KNE.reshape(K * N, E).cumsum(0).reshape(K, N, E) - 1
    position_NK = (position_KNE * onehot_KNE).sum(-1).t()
    return position_NK < capacity


class TopKRouter(nn.Module):
    """Linear gate (D -> E, no bias), softmax, stable top-k, optional jitter and capacity; see the module doc.

    Args:
        dim: D. num_experts: E. top_k: k (1 <= k <= E).
        capacity_factor: None for dropless routing, else the GShard capacity factor (> 0).
        jitter: eps of the multiplicative input noise in training (0 for none).
        renormalize: with k > 1, divide the k gates by their sum (Mixtral); top-1 keeps the raw probability
            (Switch), so the router still learns through the gate.
        balance_rate: None for no balancing bias; else DeepSeek-V3's bias update speed (their 0.001), see the
            module doc and ``update_balance_bias``.
    """

    # Its statistics (aux and z losses, the load) are over the global batch: a layout that computes on each rank's
    # rows (replicate's or fully_shard's local compute, when the router is its own unit) leaves it to the DTensor path.
    _dtp_dtensor_path = True

    def __init__(self, dim: int, num_experts: int, top_k: int, *, capacity_factor: float | None = None,
                 jitter: float = 0.0, renormalize: bool = True, balance_rate: float | None = None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k({top_k}) must be between 1 and num_experts({num_experts})")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {capacity_factor}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        if balance_rate is not None and not balance_rate > 0:
            raise ValueError(f"balance_rate must be > 0 (or None for no balancing bias), got {balance_rate}")
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.jitter, self.renormalize = capacity_factor, jitter, renormalize
        self.gate = nn.Linear(dim, num_experts, bias=False)  # whole on every rank (Replicate, or ZeRO-gathered)
        self.balance_rate = balance_rate
        if balance_rate is not None:
            self.register_buffer("balance_bias", torch.zeros(num_experts))

    def forward(self, x_BTD: torch.Tensor) -> Routing:
        E, K = self.num_experts, self.top_k
        if isinstance(x_BTD, DTensor) and not all(p.is_shard(0) or p.is_replicate() for p in x_BTD.placements):
            raise ValueError(f"TopKRouter routes rows laid out Shard(0) or Replicate on each mesh dim, got "
                             f"{x_BTD.placements}; redistribute the tokens first (MoE does)")
        if self.training and self.jitter > 0:
            x_BTD = x_BTD * (1 - self.jitter + 2 * self.jitter * torch.rand_like(x_BTD))
        num_tokens = x_BTD.shape[0] * x_BTD.shape[1]  # global N
        # Local rows times the whole gate: the logits keep the tokens' row layout whatever it is (uneven too).
        logits_NE = F.linear(_local(x_BTD).reshape(-1, x_BTD.shape[-1]), self._gate_weight(x_BTD))
        probs_NE = logits_NE.softmax(-1)
        if self.balance_rate is None:
            top_NK, idx_NK = stable_topk(probs_NE, K)
        else:  # the bias picks the experts; the gates are the unbiased probabilities of those picked
            idx_NK = stable_topk(probs_NE.detach() + _local(self.balance_bias), K)[1]
            top_NK = probs_NE.gather(1, idx_NK)
        gates_NK = top_NK / top_NK.sum(-1, keepdim=True) if self.renormalize and K > 1 else top_NK

        chosen_E = _global_sum(torch.bincount(idx_NK.reshape(-1), minlength=E), x_BTD)
        chosen_E = chosen_E.full_tensor() if isinstance(chosen_E, DTensor) else chosen_E
        fraction_E = chosen_E.to(probs_NE.dtype) / (num_tokens * K)
        # Linear in the probabilities, so each rank's share of E sum_e f_e P_e sums to the global loss.
        aux = _global_sum(E * (probs_NE.sum(0) * fraction_E).sum() / num_tokens, x_BTD)
        z = _global_sum(torch.logsumexp(logits_NE, -1).square().sum() / num_tokens, x_BTD)

        keep_NK, load_E = None, chosen_E
        if self.capacity_factor is not None:
            capacity = expert_capacity(self.capacity_factor, num_tokens, K, E)
            keep_NK, load_E = self._keep(idx_NK, x_BTD, capacity)
        if not isinstance(x_BTD, DTensor):
            return Routing(idx_NK, gates_NK, keep_NK, aux, z, load_E, chosen_E=chosen_E)
        return Routing(idx_NK, gates_NK, keep_NK, aux, z, load_E, tuple(_row_placements(x_BTD)), x_BTD.device_mesh,
                       tuple(x_BTD.shape[:2]), chosen_E)

    @torch.no_grad()
    def update_balance_bias(self, chosen_E: torch.Tensor) -> None:
        """DeepSeek-V3's update: ``bias_e += balance_rate * sign(mean load - load_e)``, from the global number of
        assignments each expert was chosen for (``Routing.chosen_E``; sum them over micro-batches first)."""
        if self.balance_rate is None:
            raise ValueError("update_balance_bias: this router has no balancing bias; build it with balance_rate=...")
        chosen_E = _local(chosen_E).to(torch.float32)
        _local(self.balance_bias).add_(self.balance_rate * torch.sign(chosen_E.mean() - chosen_E))

    def _gate_weight(self, x_BTD: torch.Tensor) -> torch.Tensor:
        w = self.gate.weight
        if not isinstance(x_BTD, DTensor):
            return w
        if not isinstance(w, DTensor) or not all(p.is_replicate() for p in w.placements):
            got = w.placements if isinstance(w, DTensor) else "a plain tensor"
            raise ValueError(f"TopKRouter: the gate weight must be a Replicate DTensor on the tokens' mesh "
                             f"(replicate / fully_shard / distribute_module the model), got {got}")
        return local_weight(w, x_BTD.placements)

    def _keep(self, idx_NK: torch.Tensor, x_BTD: torch.Tensor, capacity: int):
        """This rank's rows of the keep mask one device computes, and the global kept load per expert."""
        E, K = self.num_experts, self.top_k
        if not isinstance(x_BTD, DTensor):
            keep_NK = capacity_keep(idx_NK, E, capacity)
            return keep_NK, torch.bincount(idx_NK[keep_NK], minlength=E)
        B, T = x_BTD.shape[0], x_BTD.shape[1]
        mesh, rows = x_BTD.device_mesh, _row_placements(x_BTD)
        local_BTK = idx_NK.reshape(-1, T, K)
        whole_BTK = DTensor.from_local(local_BTK, mesh, rows, shape=(B, T, K)).full_tensor()
        keep_BTK = capacity_keep(whole_BTK.reshape(-1, K), E, capacity).reshape(B, T, K)
        load_E = torch.bincount(whole_BTK[keep_BTK], minlength=E)
        mine = dtp.distribute_tensor(keep_BTK, mesh, rows, src_data_rank=None).to_local()  # my rows, no comm
        return mine.reshape(-1, K), load_E


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def local_weight(w: torch.Tensor, token_placements) -> torch.Tensor:
    """This rank's block of weight ``w`` for a local computation on tokens laid out as ``token_placements``.
    Its gradient is Partial where the tokens are split (Shard(0)) but the weight is whole: each rank saw only
    its own tokens."""
    if not isinstance(w, DTensor):
        return w
    grad = [Partial() if t.is_shard(0) and p.is_replicate() else p for t, p in zip(token_placements, w.placements)]
    return w.to_local(grad_placements=grad)


def _row_placements(x: DTensor) -> list:
    """Token rows as laid out on the mesh: Shard(0) on the batch dims, Replicate elsewhere."""
    return [Shard(0) if p.is_shard(0) else Replicate() for p in x.placements]


def _global_sum(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The sum over the global batch of per-rank partial sums: Partial on ``like``'s batch dims (a DTensor;
    differentiable), or ``local`` itself when ``like`` is a plain tensor."""
    if not isinstance(like, DTensor):
        return local
    placements = [Partial() if p.is_shard(0) else Replicate() for p in like.placements]
    return DTensor.from_local(local, like.device_mesh, placements)

"""Re-placing experts across ep ranks during training (FlexMoE, SmartMoE): an expert's weights, gradient and
optimizer state move together to another rank, and the ``MoE``'s ``expert_slot`` follows, so routing (by
expert id) is untouched and training goes on exactly as before the move.

``place_experts(moe, new_slot_E, optimizer)`` moves rows of the expert dim of every tensor that has the
expert weights' layout, with one variable-split all-to-all on the ep mesh dim per tensor
(``collectives.all_to_all_splits``: an expert that changes rank is sent once; one that stays does not
travel). No count exchange is needed: the old and new placements are global, so every rank knows what it
sends and receives. ``ExpertRebalancer`` is the training-loop side: it sums the measured load over steps and,
every ``every`` steps, re-places when ``moe_balance.PlacementCost`` says the saving beats the move.

Legend: E experts, L experts per ep rank, n ep ranks, X the trailing dims of an expert weight.
"""

from __future__ import annotations

import torch
from torch import nn

from dtensor_plus import DTensor
from dtensor_plus.collectives import all_to_all_splits

from .moe import MoE
from .moe_balance import PlacementCost, balanced_slots, imbalance, moved_experts

__all__ = ["place_experts", "ExpertRebalancer", "ep_of"]


def ep_of(moe: MoE) -> tuple[object, int | None]:
    """(mesh, ep mesh dim) of ``moe``'s experts: the mesh dim where ``w1`` is Shard(0); (None, None) if none."""
    w1 = moe.experts.w1
    if not isinstance(w1, DTensor):
        return None, None
    found = [k for k, p in enumerate(w1.placements) if p.is_shard(0)]
    if len(found) > 1:  # the hierarchical layout (nodes, ranks per node): rows would move on one of its dims only
        raise ValueError(f"re-placing experts needs them on one ep mesh dim; these are Shard(0) on mesh dims "
                         f"{[w1.device_mesh.mesh_dim_name(k) for k in found]} (expert_parallel with a pair of ep dims)")
    return (w1.device_mesh, found[0]) if found else (w1.device_mesh, None)


@torch.no_grad()
def place_experts(moe: MoE, new_slot_E: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Put expert e at row ``new_slot_E[e]`` of the expert weights (ep rank ``new_slot_E[e] // L``), moving each
    expert weight, its gradient and its optimizer state (every state tensor of the weight's shape; 0-dim ones
    such as AdamW's ``step`` stay). Every rank calls it with the same ``new_slot_E``."""
    slot_E = _local(moe.expert_slot)
    new_slot_E = torch.as_tensor(new_slot_E, dtype=slot_E.dtype).cpu()
    E = slot_E.numel()
    if sorted(new_slot_E.tolist()) != list(range(E)):
        raise ValueError(f"place_experts: a placement gives each of the {E} experts its own row 0..{E - 1}; "
                         f"got {new_slot_E.tolist()}")
    source_Q = torch.empty_like(new_slot_E)
    source_Q[new_slot_E] = slot_E.cpu()  # new row q holds what old row source_Q[q] held
    mesh, ep_mesh_dim = ep_of(moe)
    for param in (moe.experts.w1, moe.experts.w2):
        for t in _moving_with(param, optimizer):
            local = _local(t)
            local.copy_(_permute_rows(local, source_Q.to(local.device), mesh, ep_mesh_dim))
    slot_E.copy_(new_slot_E.to(slot_E.device))


def _moving_with(param: nn.Parameter, optimizer) -> list[torch.Tensor]:
    """The weight, its gradient, and its optimizer state tensors: everything laid out along its expert dim."""
    tensors = [param] + ([param.grad] if param.grad is not None else [])
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    for key, value in state.items():
        if not torch.is_tensor(value) or value.ndim == 0:
            continue
        same_layout = value.shape == param.shape and (
            not isinstance(param, DTensor) or (isinstance(value, DTensor) and value.placements == param.placements))
        if not same_layout:
            raise ValueError(
                f"place_experts: optimizer state {key!r} of an expert weight is laid out unlike the weight "
                f"({tuple(value.shape)}, {getattr(value, 'placements', 'plain')} against {tuple(param.shape)}, "
                f"{getattr(param, 'placements', 'plain')}); re-place experts with an optimizer whose state follows "
                f"its parameters (torch.optim's AdamW, SGD...), not a sharded-state one"
            )
        tensors.append(value)
    return tensors


def _permute_rows(local_LX: torch.Tensor, source_Q: torch.Tensor, mesh, ep_mesh_dim: int | None) -> torch.Tensor:
    """This rank's rows of the new expert dim (row q = old row ``source_Q[q]``) from its rows of the old one."""
    if ep_mesh_dim is None or mesh.size(ep_mesh_dim) == 1:
        return local_LX[source_Q]
    n, me = mesh.size(ep_mesh_dim), mesh.get_local_rank(ep_mesh_dim)
    L = source_Q.numel() // n
    dest_P = torch.empty_like(source_Q)
    dest_P[source_Q] = torch.arange(source_Q.numel(), device=source_Q.device)  # old row p goes to new row dest_P[p]
    mine = torch.arange(me * L, (me + 1) * L, device=source_Q.device)
    send_order = torch.argsort(dest_P[mine], stable=True)  # my old rows by destination row: grouped by rank
    send_splits = torch.bincount(dest_P[mine] // L, minlength=n).tolist()
    recv_splits = torch.bincount(source_Q[mine] // L, minlength=n).tolist()
    received = all_to_all_splits(local_LX[send_order], mesh, ep_mesh_dim, send_splits, recv_splits)
    # rows arrive by (source rank, destination row): sort my new rows the same way to know which is which
    arrival = torch.argsort(source_Q[mine] // L * source_Q.numel() + mine, stable=True)
    out = torch.empty_like(local_LX)
    out[arrival] = received
    return out


class ExpertRebalancer:
    """Measure each MoE layer's load during training and re-place its experts when it pays.

    Call ``step()`` once per optimizer step, after ``optimizer.step()``: it adds each layer's last global load
    (``MoE.routing.chosen_E``) to a running sum and, every ``every`` steps, plans ``balanced_slots`` from it and
    moves the experts (``place_experts``) where ``cost.pays`` (always, when ``cost`` is None). ``history`` holds,
    per re-plan and layer, (imbalance before, imbalance after, experts moved): max / mean assignments per rank
    over the window under the old placement and the new one, and how many experts changed rank (0: none moved).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, every: int,
                 cost: PlacementCost | None = None):
        if every < 1:
            raise ValueError(f"ExpertRebalancer: every must be >= 1 step, got {every}")
        self.layers = [m for m in model.modules() if isinstance(m, MoE)]
        if not self.layers:
            raise ValueError(f"ExpertRebalancer: {type(model).__name__} has no MoE layer to balance")
        self.optimizer, self.every, self.cost = optimizer, every, cost
        self.steps = 0
        self.window = [torch.zeros(m.experts.num_experts, dtype=torch.float64) for m in self.layers]
        self.history: list[list[tuple[float, float, int]]] = []

    def step(self) -> bool:
        """Account this step's load; re-plan on every ``every``-th call. True when some expert moved."""
        for total, moe in zip(self.window, self.layers):
            if moe.routing is None or moe.routing.chosen_E is None:
                raise ValueError("ExpertRebalancer.step: a MoE layer has not run a forward since it was built")
            total += _local(moe.routing.chosen_E).cpu().double()
        self.steps += 1
        if self.steps % self.every:
            return False
        moved_any, record = False, []
        for i, moe in enumerate(self.layers):
            mesh, ep_mesh_dim = ep_of(moe)
            ep = 1 if ep_mesh_dim is None else mesh.size(ep_mesh_dim)
            old = _local(moe.expert_slot).cpu().clone()
            new = balanced_slots(self.window[i], old, ep)
            pays = not torch.equal(new, old) and (self.cost is None or self.cost.pays(self.window[i], old, new, ep))
            record.append((imbalance(self.window[i], old, ep), imbalance(self.window[i], new if pays else old, ep),
                           moved_experts(old, new, ep) if pays else 0))
            if pays:
                place_experts(moe, new, self.optimizer)
                moved_any = True
            self.window[i].zero_()
        self.history.append(record)
        return moved_any


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t

"""Load balancing for the MoE GPT of examples/gpt.py while it trains (examples/train_gpt.py --moe-balance).

Two ways, alone or together (``MoEBalancing.mode``):

* ``place`` (FlexMoE, SmartMoE): ``ExpertRebalancer`` sums each MoE layer's load over ``every`` steps, then
  moves hot experts to other ep ranks, weights and AdamW state together (layouts/moe_placement.py). Routing
  is by expert id, so the model computes exactly what it did: only which rank runs which expert changes.
* ``bias`` (DeepSeek-V3, auxiliary-loss-free): each router adds a bias to its top-k scores, moved by ``rate``
  after every optimizer step against its expert's load (``MoE.update_balance_bias``). This changes routing,
  so the one-device run updates its bias the same way (the update follows the global load: equal on both).

``skew`` makes the imbalance deterministic and large for a demonstration: every MoE block's ``ln2`` gets a
bias of one (its output has mean about 1) and the router rows of experts 0 and 1, both on ep rank 0, get
``skew / D`` added, a logit bonus of about ``skew`` for them on every token.

The figure is max / mean of the tokens each ep rank's experts process (``moe_balance.imbalance``: 1.0 is
even; the step waits for the busiest rank), the worst over the MoE layers, per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dtensor_plus import DTensor
from dtensor_plus.layouts.moe_balance import imbalance
from dtensor_plus.layouts.moe_placement import ExpertRebalancer, ep_of

__all__ = ["MODES", "MoEBalancing", "skew_router", "rank_imbalance", "layer_imbalance", "experts_in_id_order"]

MODES = ("none", "place", "bias", "both")
HOT_EXPERTS = (0, 1)


@dataclass
class MoEBalancing:
    """What train_gpt.py balances: ``mode`` (one of MODES), re-placing every ``every`` steps, the bias moved by
    ``rate`` per step, and a router ``skew`` (0: the router as initialised)."""

    mode: str = "none"
    every: int = 2
    rate: float = 0.01
    skew: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"MoEBalancing.mode must be one of {MODES}, got {self.mode!r}")
        if self.every < 1:
            raise ValueError(f"MoEBalancing.every must be >= 1 step, got {self.every}")
        if self.uses_bias and not self.rate > 0:
            raise ValueError(f"MoEBalancing.rate must be > 0 for mode {self.mode!r}, got {self.rate}")

    @property
    def uses_bias(self) -> bool:
        return self.mode in ("bias", "both")

    @property
    def uses_placement(self) -> bool:
        return self.mode in ("place", "both")

    def config(self, config):
        """``config`` with the routers' balancing bias on when the mode uses it."""
        return config.replace(moe_balance_rate=self.rate if self.uses_bias else None)

    def stepper(self, model, optimizer, placement: bool = True) -> "BalanceSteps":
        """The per-step hook for ``model``; ``placement=False`` for the one-device run, where re-placing
        experts would change nothing (one rank holds them all)."""
        rebalancer = ExpertRebalancer(model, optimizer, self.every) if placement and self.uses_placement else None
        return BalanceSteps(model, self.uses_bias, rebalancer)


@dataclass
class BalanceSteps:
    """Call after each ``optimizer.step()``: records the step's imbalance (from the load of the forward just
    run, under the placement it ran with), then moves the bias and re-places experts as configured."""

    model: torch.nn.Module
    bias: bool
    rebalancer: ExpertRebalancer | None
    imbalance: list[float] = field(default_factory=list)

    def __call__(self) -> None:
        self.imbalance.append(rank_imbalance(self.model))
        for moe in self.model.moe_layers():
            if self.bias:
                moe.update_balance_bias()
        if self.rebalancer is not None:
            self.rebalancer.step()


@torch.no_grad()
def skew_router(model, bonus: float) -> None:
    """Make every MoE block's router favour experts 0 and 1 by a logit of about ``bonus`` (see the module doc).
    Call on the plain model, before it is copied or laid out."""
    for block in model.blocks:
        if not hasattr(block.mlp, "moe"):  # a dense block
            continue
        if block.ln2.bias is None:
            raise ValueError("skew_router needs the LayerNorms' bias (GPTConfig(bias=True)) to shift the router input")
        block.ln2.bias.fill_(1.0)
        gate = block.mlp.moe.router.gate.weight
        gate[list(HOT_EXPERTS)] += bonus / gate.shape[1]


def rank_imbalance(model) -> float:
    """The worst MoE layer's max / mean tokens per ep rank in the last forward (1.0 with no ep dim)."""
    return max([1.0] + [layer_imbalance(moe) for moe in model.moe_layers()])


def layer_imbalance(moe) -> float:
    """Max / mean tokens per ep rank of one ``MoE`` layer's last forward, under its current placement."""
    mesh, ep_mesh_dim = ep_of(moe)
    ep = 1 if ep_mesh_dim is None else mesh.size(ep_mesh_dim)
    return imbalance(moe.load, _local(moe.expert_slot), ep)


def experts_in_id_order(model, name: str, full: torch.Tensor) -> torch.Tensor:
    """``full`` (the whole parameter ``name`` of ``model``) with an MoE layer's expert rows put back in expert
    id order (row e = expert e), whatever re-placement did; any other parameter unchanged."""
    owner_name, _, leaf = name.rpartition(".")
    if not owner_name.endswith(".experts") or leaf not in ("w1", "w2"):
        return full
    moe = model.get_submodule(owner_name.rpartition(".")[0])
    return full[_local(moe.expert_slot)]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t

"""How examples/gpt.py's GPT is laid out on a mesh: the Layout dataclass and the functions that place the
model, its batches and its optimizer (used by train_gpt.py and the tests; no training loop here)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate, Shard
from dtensor_plus.layouts import ZeroRedundancyOptimizer, fully_shard, parallelize_module
from dtensor_plus.layouts.data import replicate
from dtensor_plus.layouts.moe import expert_parallel
from dtensor_plus.placements import StridedShard
from gpt import GPT, tp_plan

WEIGHT_DECAY = 0.1


@dataclass(frozen=True)
class Layout:
    """How the model is laid out: dp x tp ranks, Megatron sequence parallelism on tp, ZeRO stage on dp.

    zero: 0 plain data parallelism (``replicate``: one all-reduce per gradient), 1 optimizer state sharded,
    2 plus gradients reduce-scattered (both ``ZeroRedundancyOptimizer``), 3 plus parameters sharded
    (``fully_shard`` per block, then the root).
    """

    dp: int = 1
    tp: int = 1
    sp: bool = False
    zero: int = 0
    cp: int = 1
    cp_kind: str = "ring"
    cp_balance: bool = False  # zigzag the sequence over cp: every rank does equal causal-attention work

    def __post_init__(self):
        for name in ("dp", "tp", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Layout.{name} must be a positive int, got {value!r}")
        if self.sp and self.tp == 1:
            raise ValueError("sp=True needs tp > 1: sequence parallelism shards the sequence on the tp mesh dim")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.zero and self.dp == 1:
            raise ValueError(f"zero={self.zero} shards on the dp mesh dim and needs dp > 1; set dp or zero=0")
        if self.sp and self.cp > 1:
            raise ValueError("sp and cp both shard the sequence; context parallelism (cp) already covers the norms")
        if self.cp_kind not in ("ring", "ulysses"):
            raise ValueError(f"cp_kind must be 'ring' or 'ulysses', got {self.cp_kind!r}")
        if self.cp_balance and (self.cp == 1 or self.cp_kind != "ring"):
            raise ValueError("cp_balance zigzags the sequence for ring attention: it needs cp > 1 and cp_kind='ring'")

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.cp

    def __str__(self) -> str:
        cp = f" cp={self.cp} ({self.cp_kind}{', balanced' if self.cp_balance else ''})" if self.cp > 1 else ""
        return f"dp={self.dp} tp={self.tp} sp={self.sp} zero={self.zero}{cp}"


# -- placing ----------------------------------------------------------------------------------------------


def make_mesh(layout: Layout):
    """A mesh with a named dim per parallelism of size > 1, in the order ("dp", "tp", "cp") (cp innermost:
    Ulysses splits tp's blocks of heads further)."""
    sizes = (("dp", layout.dp), ("tp", layout.tp), ("cp", layout.cp))
    names, shape = zip(*[(n, s) for n, s in sizes if s > 1] or [("dp", 1)])
    return dtp.init_device_mesh("cpu", shape, mesh_dim_names=names)


def place_batch(batch: torch.Tensor, mesh, balance: bool = False) -> DTensor:
    """Whole (B, T) tokens as a DTensor: batch Shard(0) on dp, sequence Shard(1) on cp (``balance``: zigzag,
    rank r holding pieces r and 2cp-1-r of 2cp), Replicate elsewhere."""
    by_name = {"dp": Shard(0), "cp": StridedShard(1, 1, zigzag=True) if balance else Shard(1)}
    placements = [by_name.get(name, Replicate()) for name in mesh.mesh_dim_names]
    return dtp.distribute_tensor(batch, mesh, placements, src_data_rank=None)


def place_model(model: GPT, mesh, layout: Layout) -> GPT:
    """Lay ``model`` out on ``mesh`` (in place): tp first on mesh["tp"], then the dp dim.

    Every parameter and buffer must end on the whole mesh before ZeRO sees it: ``fully_shard`` and
    ``ZeroRedundancyOptimizer`` take DTensors on the mesh they are given (Replicate on dp), not tp-placed ones
    on the mesh["tp"] sub-mesh, and the causal-mask buffer must be a DTensor too. ``replicate`` lifts them all
    (no data moves); with ZeRO its gradient hooks stay off, because ZeRO reduce-scatters the gradients itself
    (an all-reduce first would double the traffic).
    """
    if layout.tp > 1:
        parallelize_module(model, mesh["tp"], tp_plan(model.config, sequence_parallel=layout.sp))
    if layout.dp == 1 and layout.cp == 1:
        dtp.distribute_module(model, mesh)  # replicate what tp_plan leaves plain (position embedding, norms)
        return model
    # Under cp each rank's gradients cover its part of the sequence: reduced over cp (and dp) like dp's.
    replicate(model, mesh, dp_mesh_dim="dp" if layout.dp > 1 else "cp", reduce_in_backward=layout.zero == 0)
    if model.config.moe_experts:
        # Experts sharded over the data-parallel ranks (ep = dp, after replicate, which wants Replicate on dp):
        # E/dp whole experts per rank, tokens moved to them by all-to-all; with tp, each expert's width split too.
        expert_parallel(model, mesh, ep_mesh_dim="dp" if layout.dp > 1 else None,
                        tp_mesh_dim="tp" if layout.tp > 1 else None)
    if layout.zero == 3:
        # FSDP2 order: the blocks first, then the root, which owns the rest (embeddings, final norm, head).
        for block in model.blocks:
            fully_shard(block, mesh, mesh_dim="dp")
        fully_shard(model, mesh, mesh_dim="dp")
    return model


def make_optimizer(model: GPT, mesh, layout: Layout, lr: float):
    """AdamW; for ZeRO 1/2 wrapped in ``ZeroRedundancyOptimizer`` (sharded state), otherwise plain (for ZeRO 3
    its state is sharded because the parameters are)."""
    kwargs = dict(lr=lr, weight_decay=WEIGHT_DECAY, foreach=False)
    if layout.zero in (1, 2):
        return ZeroRedundancyOptimizer(
            model.parameters(), mesh, torch.optim.AdamW, stage=layout.zero, mesh_dim="dp", **kwargs
        )
    return torch.optim.AdamW(model.parameters(), **kwargs)



"""How examples/gpt.py's GPT is laid out on a mesh: the Layout dataclass and the functions that place the
model, its batches and its optimizer (used by train_gpt.py and the tests; no training loop here)."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate, Shard
from dtensor_plus.layouts import ZeroRedundancyOptimizer, fully_shard, parallelize_module
from dtensor_plus.layouts.context_parallel import CONTEXT_PARALLEL_KINDS, context_parallel, striped_placement
from dtensor_plus.layouts.data import replicate
from dtensor_plus.layouts.moe import expert_parallel
from dtensor_plus.placements import StridedShard
from gpt import GPT, tp_plan

WEIGHT_DECAY = 0.1
# The context mesh dims each cp kind runs on, in mesh order (outer first): cp ranks split over them.
CP_MESH_DIMS = {"ring": ("cp",), "ulysses": ("cp",), "usp": ("ring", "ulysses"), "double_ring": ("outer", "inner"),
                "loongtrain": ("outer", "inner", "ulysses")}
CP_BALANCES = ("none", "zigzag", "striped", "distflash")  # causal load balance of the ring (none: plain Shard)


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
    cp_kind: str = "ring"  # one of CP_MESH_DIMS: usp, double_ring, loongtrain split cp over 2 or 3 mesh dims
    cp_balance: str = "none"  # one of CP_BALANCES (ring only); the old bool still works: True is "zigzag"

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
        if self.cp_kind not in CONTEXT_PARALLEL_KINDS:
            raise ValueError(f"cp_kind must be one of {CONTEXT_PARALLEL_KINDS}, got {self.cp_kind!r}")
        if isinstance(self.cp_balance, bool):  # the bool this field was before the balancers had names
            object.__setattr__(self, "cp_balance", "zigzag" if self.cp_balance else "none")
        if self.cp_balance not in CP_BALANCES:
            raise ValueError(f"cp_balance must be one of {CP_BALANCES}, got {self.cp_balance!r}")
        if self.cp_balance != "none" and (self.cp == 1 or self.cp_kind != "ring"):
            raise ValueError(f"cp_balance={self.cp_balance!r} balances ring attention's causal work: it needs cp > 1 "
                             f"and cp_kind='ring' (Ulysses is balanced already), got cp={self.cp} "
                             f"cp_kind={self.cp_kind!r}")
        if self.cp > 1:
            cp_shape(self.cp, self.cp_kind)  # raises if cp does not split over the kind's mesh dims

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.cp

    def __str__(self) -> str:
        balance = f", {self.cp_balance} balance" if self.cp_balance != "none" else ""
        shape = cp_shape(self.cp, self.cp_kind) if self.cp > 1 else ()
        split = f" on {' x '.join(map(str, shape))}" if len(shape) > 1 else ""
        cp = f" cp={self.cp} ({self.cp_kind}{split}{balance})" if shape else ""
        return f"dp={self.dp} tp={self.tp} sp={self.sp} zero={self.zero}{cp}"


def cp_shape(cp: int, kind: str) -> tuple[int, ...]:
    """How ``cp`` ranks split over ``kind``'s context mesh dims (CP_MESH_DIMS), each > 1, as square as can be
    (outer dims no larger than inner ones): cp=4 usp is 2 x 2, cp=8 double_ring 2 x 4, cp=8 loongtrain 2 x 2 x 2."""
    count = len(CP_MESH_DIMS[kind])
    shape = _split(cp, count)
    if shape is None:
        raise ValueError(f"cp_kind={kind!r} splits cp over {count} mesh dims {CP_MESH_DIMS[kind]}, each of size > 1, "
                         f"but cp={cp} has no such split; use cp={2 ** count} (or another product of {count} "
                         f"factors > 1), or cp_kind='ring'")
    return shape


def _split(size: int, count: int, least: int = 2) -> tuple[int, ...] | None:
    """``size`` as a product of ``count`` factors >= ``least``, in non-decreasing order, the outer ones as large
    as they can be; None if there is none."""
    if count == 1:
        return (size,) if size >= least else None
    for outer in reversed([d for d in range(least, size) if size % d == 0 and d ** count <= size]):
        inner = _split(size // outer, count - 1, outer)
        if inner is not None:
            return (outer, *inner)
    return None


def cp_scope(layout: Layout):
    """What train() runs each step inside: ``context_parallel`` on the layout's context mesh dims (a no-op
    without cp)."""
    if layout.cp == 1:
        return contextlib.nullcontext
    dims = CP_MESH_DIMS[layout.cp_kind]
    balance = {"none": False}.get(layout.cp_balance, layout.cp_balance)
    return functools.partial(context_parallel, dims if len(dims) > 1 else dims[0], layout.cp_kind,
                             load_balance=balance)


# -- placing ----------------------------------------------------------------------------------------------


def make_mesh(layout: Layout):
    """A mesh with a named dim per parallelism of size > 1, in the order ("dp", "tp", then the context dims of
    CP_MESH_DIMS[cp_kind]) (cp innermost: Ulysses splits tp's blocks of heads further)."""
    cp_dims = zip(CP_MESH_DIMS[layout.cp_kind], cp_shape(layout.cp, layout.cp_kind)) if layout.cp > 1 else ()
    sizes = (("dp", layout.dp), ("tp", layout.tp), *cp_dims)
    names, shape = zip(*[(n, s) for n, s in sizes if s > 1] or [("dp", 1)])
    return dtp.init_device_mesh("cpu", shape, mesh_dim_names=names)


def place_batch(batch: torch.Tensor, mesh, balance: str | bool = "none") -> DTensor:
    """Whole (B, T) tokens as a DTensor: batch Shard(0) on dp, sequence Shard(1) on each context mesh dim,
    Replicate elsewhere. ``balance`` (Layout.cp_balance; True is "zigzag"), on the one cp dim: "zigzag" rank r
    holds pieces r and 2cp-1-r of 2cp; "striped" token t on rank t mod cp; "distflash" keeps Shard(1) (it
    balances the schedule, not the placement)."""
    names = mesh.mesh_dim_names
    cp_names = {name for dims in CP_MESH_DIMS.values() for name in dims}
    balance = {True: "zigzag", False: "none"}.get(balance, balance)
    sequence = {"zigzag": lambda: StridedShard(1, 1, zigzag=True),
                "striped": lambda: striped_placement(1, batch.shape[1], mesh.size("cp"))}
    cp_placement = sequence.get(balance, lambda: Shard(1))()
    placements = [Shard(0) if name == "dp" else cp_placement if name in cp_names else Replicate() for name in names]
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
    replicate(model, mesh, dp_mesh_dim="dp" if layout.dp > 1 else CP_MESH_DIMS[layout.cp_kind][0],
              reduce_in_backward=layout.zero == 0)
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



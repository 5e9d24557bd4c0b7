"""How benchmarks/train_step.py places the GPT for each layout: dtensor_plus's way and PyTorch's own stack.

Each ``place_*`` function takes a fresh GPT (same seed on every rank) and the world size and returns a
``Placed``: the model, its optimizer, and how to turn the global (tokens, targets) batch into the model's
inputs. The torch functions import torch.distributed.tensor / fsdp (the benchmark may; the library never does).

Layouts (n = world size): dp (dp=n), tp (tp=n), tp+sp (tp=n), dp x tp + sp (dp=2, tp=n/2),
zero-1, zero-2, zero-3 (dp=n). AdamW, fp32, foreach=False (as examples/train_gpt.py). ``unfit_reason`` says
when a layout's mesh cannot be made from n ranks (dp x tp+sp on an odd n); at n = 1 the others run as the
single-device step through each stack's machinery (meshes of size 1, no communication).

``device`` ("cpu" or "cuda") is where the meshes, the model and so the step live; with "cuda" the caller has
started NCCL and set this rank's GPU (benchmarks/train_step.py ``--device cuda``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

import dtensor_plus as dtp
from dtensor_plus.layouts import ZeroRedundancyOptimizer, fully_shard, loss_parallel, parallelize_module, replicate
from dtensor_plus.layouts.data import shard_batch, sync_gradients
from gpt import tp_plan

LR = 1e-3
LAYOUTS = ("dp", "tp", "tp+sp", "dp x tp+sp", "zero-1", "zero-2", "zero-3")


@dataclass
class Placed:
    model: torch.nn.Module
    opt: object
    inputs: Callable  # (tokens, targets) global batch -> (tokens, targets) as the model takes them
    loss_ctx: Callable = contextlib.nullcontext
    after_backward: Callable = lambda: None  # e.g. a hand-written gradient all-reduce
    mesh_shape: dict = field(default_factory=dict)


def _adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.1, foreach=False)


def mesh_shape(layout: str, world: int) -> dict:
    if layout in ("tp", "tp+sp"):
        return {"tp": world}
    if layout == "dp x tp+sp":
        return {"dp": 2, "tp": world // 2}
    return {"dp": world}


def unfit_reason(layout: str, world: int) -> str | None:
    """Why ``layout``'s mesh cannot be made from ``world`` ranks; None when it can. (A tp size that does not
    divide the heads still runs on our side, uneven; torch's side reports its own failure.)"""
    shape = mesh_shape(layout, world)
    if min(shape.values()) < 1 or math.prod(shape.values()) != world:
        mesh = " x ".join(f"{k}={v}" for k, v in shape.items())
        return f"its mesh ({mesh}) fixes dp=2 and needs an even world size >= 2, not {world}"
    return None


# -- dtensor_plus -------------------------------------------------------------------------------------------


def place_ours(layout: str, model, world: int, sync: bool = True, device: str = "cpu") -> Placed:
    shape = mesh_shape(layout, world)
    model.to(device)
    mesh = dtp.init_device_mesh(device, tuple(shape.values()), mesh_dim_names=tuple(shape))
    if "tp" in shape:
        parallelize_module(model, mesh["tp"], tp_plan(model.config, sequence_parallel="sp" in layout))
    if layout in ("dp", "dp x tp+sp"):
        replicate(model, mesh)  # one all-reduce per gradient, in its post-accumulate hook
    elif layout in ("zero-1", "zero-2"):
        replicate(model, mesh, reduce_in_backward=False)  # local forward on dp; ZeRO reduce-scatters the gradients
    elif layout == "zero-3":
        dtp.distribute_module(model, mesh)  # the causal-mask buffers too: fully_shard places only parameters
        for block in model.blocks:
            fully_shard(block, mesh)
        fully_shard(model, mesh)
    else:
        dtp.distribute_module(model, mesh)  # Replicate what the tp plan left plain
    if layout in ("zero-1", "zero-2"):
        opt = ZeroRedundancyOptimizer(model.parameters(), mesh, torch.optim.AdamW, stage=int(layout[-1]),
                                      lr=LR, weight_decay=0.1, foreach=False)
    else:
        opt = _adamw(model.parameters())
    place = lambda t: shard_batch(t, mesh) if "dp" in shape else shard_batch(t, mesh, dp_mesh_dim="-")
    # tp without dp: nothing reduces a gradient that backward leaves Partial (norms) or sequence-sharded
    # (position embedding) on tp; left so, every optimizer op reading it (lerp_, addcmul_) reduces it again.
    # sync_gradients reduces each once, as replicate()'s hook does on a dp mesh.
    after = (lambda: sync_gradients(model)) if sync and layout in ("tp", "tp+sp") else (lambda: None)
    return Placed(model, opt, lambda x, y: (place(x), place(y)), loss_parallel, after, mesh_shape=shape)


# -- PyTorch's stack ----------------------------------------------------------------------------------------


def _torch_tp_plan(config, sequence_parallel: bool) -> dict:
    """examples/gpt.py's tp_plan with torch's styles (same arguments, same patterns)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    act = Shard(1) if sequence_parallel else Replicate()
    colwise = dict(input_layouts=act, use_local_output=False)
    rowwise = dict(output_layouts=act, use_local_output=False)
    plan = {"tok_emb": RowwiseParallel(input_layouts=Replicate(), **rowwise)}
    for name in ("q", "k", "v"):
        plan[f"blocks.*.attn.{name}"] = ColwiseParallel(**colwise)
    plan["blocks.*.attn.proj"] = RowwiseParallel(**rowwise)
    plan["blocks.*.mlp.fc"] = ColwiseParallel(**colwise)
    plan["blocks.*.mlp.out"] = RowwiseParallel(**rowwise)
    if sequence_parallel:
        plan["blocks.*.ln*"] = SequenceParallel(use_local_output=False)
        plan["ln_f"] = SequenceParallel(use_local_output=False)
    plan["head"] = ColwiseParallel(**colwise)
    return plan


def _local_rows(t: torch.Tensor, dp_rank: int, dp: int) -> torch.Tensor:
    return t.chunk(dp)[dp_rank]


def place_torch(layout: str, model, world: int, device: str = "cpu") -> Placed:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor as TorchDTensor
    from torch.distributed.tensor import distribute_module
    from torch.distributed.tensor.parallel import loss_parallel as torch_loss_parallel
    from torch.distributed.tensor.parallel import parallelize_module as torch_parallelize

    shape = mesh_shape(layout, world)
    model.to(device)  # DDP keeps the module where it is; the batch arrives on the same device
    mesh = init_device_mesh(device, tuple(shape.values()), mesh_dim_names=tuple(shape))
    dp = shape.get("dp", 1)
    dp_rank = mesh.get_local_rank("dp") if "dp" in shape else 0
    local = lambda x, y: (_local_rows(x, dp_rank, dp), _local_rows(y, dp_rank, dp))
    if "tp" in shape:
        torch_parallelize(model, mesh["tp"], _torch_tp_plan(model.config, "sp" in layout))
        distribute_module(model, mesh["tp"])  # pos_emb, norms, causal mask: Replicate
        after = lambda: None
        if "dp" in shape:
            # DDP rejects DTensor parameters; the same layout by hand: one all-reduce per gradient on dp.
            group = mesh.get_group("dp")

            def after():
                for p in model.parameters():
                    g = p.grad.to_local() if isinstance(p.grad, TorchDTensor) else p.grad
                    dist.all_reduce(g, group=group)
                    g.div_(dp)
        return Placed(model, _adamw(model.parameters()), local, torch_loss_parallel, after, shape)
    if layout == "dp":
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        return Placed(ddp, _adamw(ddp.parameters()), local, mesh_shape=shape)
    if layout == "zero-1":
        from torch.distributed.optim import ZeroRedundancyOptimizer as TorchZero

        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = TorchZero(ddp.parameters(), optimizer_class=torch.optim.AdamW, lr=LR, weight_decay=0.1, foreach=False)
        return Placed(ddp, opt, local, mesh_shape=shape)
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    # zero-2: FSDP2 without resharding after forward (parameters stay gathered from forward to backward:
    # its nearest zero-2); zero-3: FSDP2 as torchtitan uses it.
    reshard = layout == "zero-3"
    for block in model.blocks:
        torch_fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    torch_fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    return Placed(model, _adamw(model.parameters()), local, mesh_shape=shape)

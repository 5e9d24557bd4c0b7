"""One AdamW step over a GPT's parameters as DTensors: dtensor_plus beside torch.distributed.tensor, same run.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 benchmarks/optimizer_step.py

Parameters: the shapes of a small GPT (embedding, 4 blocks of q/k/v/o and MLP weights and norms, head), each
Shard(0) on a 1-D mesh of the world (rows no rank count divides included) or Replicate for norms and biases;
gradients already reduced (what data parallelism leaves). For each library and each of torch.optim's three
paths (the per-tensor loop, ``foreach=True``, ``fused=True``) it prints the median step time in milliseconds
and ours / torch's; plain torch on the local blocks is the floor.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

import dtensor_plus as dtp

REPEATS = int(os.environ.get("REPEATS", "30"))
D, V, BLOCKS = 128, 1001, 4


def _shapes() -> list[tuple[tuple[int, ...], bool]]:
    """(shape, sharded) of each parameter."""
    shapes = [((V, D), True)]
    for _ in range(BLOCKS):
        shapes += [((D,), False), ((3 * D, D), True), ((D, D), True), ((D,), False), ((4 * D, D), True),
                   ((D, 4 * D), True), ((4 * D,), False)]
    return shapes + [((D,), False), ((V, D), True)]


def _params(distribute, shard, replicate):
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape, sharded in _shapes():
        whole = torch.randn(shape, generator=gen)
        p = torch.nn.Parameter(distribute(whole, shard if sharded else replicate))
        p.grad = distribute(torch.randn(shape, generator=gen), shard if sharded else replicate)
        params.append(p)
    return params


def _time_steps(params, **flags) -> float:
    opt = torch.optim.AdamW(params, lr=1e-3, **flags)
    opt.step()  # states created, plans cached
    times = []
    for _ in range(REPEATS):
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    world = dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate as TorchReplicate
    from torch.distributed.tensor import Shard as TorchShard
    from torch.distributed.tensor import distribute_tensor as torch_distribute

    ours_mesh = dtp.init_device_mesh("cpu", (world,))
    torch_mesh = init_device_mesh("cpu", (world,))
    makers = {
        "dtensor_plus": lambda: _params(lambda t, p: dtp.distribute_tensor(t, ours_mesh, [p]), dtp.Shard(0), dtp.Replicate()),
        "torch DTensor": lambda: _params(lambda t, p: torch_distribute(t, torch_mesh, [p]), TorchShard(0), TorchReplicate()),
    }
    makers["plain torch (local blocks)"] = lambda: _plain_local(makers["dtensor_plus"]())
    rows = []
    for path, flags in (("loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        row = {name: _time_steps(make(), **flags) for name, make in makers.items()}
        rows.append((path, row))
    if dist.get_rank() == 0:
        print(f"AdamW step, {len(_shapes())} GPT parameters (D={D}, V={V}), {world} ranks, ms (median of {REPEATS})")
        print(f"{'path':8} {'dtensor_plus':>13} {'torch DTensor':>14} {'plain local':>12} {'ours/torch':>11}")
        for path, row in rows:
            ours, theirs, plain = row["dtensor_plus"], row["torch DTensor"], row["plain torch (local blocks)"]
            print(f"{path:8} {ours:13.2f} {theirs:14.2f} {plain:12.2f} {ours / theirs:11.2f}")


def _plain_local(params) -> list:
    """This rank's blocks of ``params`` (and of their gradients) as plain parameters: the floor."""
    plain = []
    for p in params:
        local = torch.nn.Parameter(p.to_local().detach().clone())
        local.grad = p.grad.to_local().clone()
        plain.append(local)
    return plain


if __name__ == "__main__":
    main()

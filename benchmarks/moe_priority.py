"""Lina: the MoE's backward all-to-alls under a concurrent gradient all-reduce, issued as one collective (what a
DDP bucket does) against cut into pieces and issued in the gaps between the all-to-alls
(``moe_priority.AllToAllFirst``).

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 4 benchmarks/moe_priority.py

``MoE(D, F, E, k, dispatch_chunks=C)`` on a 1-D ``ep`` mesh that is also the data-parallel dim, and a flat
"gradient bucket" of ``--bucket-mb`` MiB per rank, handed over as the MoE's backward starts (a hook on the
layer's output gradient: the bucket of the layers after it, filled first), on the same process group as the
all-to-alls. Three ways, in alternating rounds on the same warm ranks (medians, slowest rank):

- ``alone``: no all-reduce (the all-to-alls' own latency);
- ``one collective``: ``collectives.all_reduce(bucket, async_op=True)`` at hand-over, waited after backward;
- ``lina``: ``AllToAllFirst(piece_bytes)`` at hand-over, waited after backward.

Rank 0 prints the time backward is blocked on the all-to-alls (issue calls plus waits, timed by wrapping the
library's entry points from outside), backward's time, and backward plus the all-reduce's wait.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.distributed as dist

import dtensor_plus as dtp
from dtensor_plus import Shard, collectives
from dtensor_plus.layouts import moe_pipelined
from dtensor_plus.layouts.data import replicate
from dtensor_plus.layouts.moe import MoE, expert_parallel
from dtensor_plus.layouts.moe_priority import AllToAllFirst

BLOCKED = [0.0]  # seconds blocked on the all-to-alls since the last reset (this benchmark's own counter)


def install_timers() -> None:
    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                BLOCKED[0] += time.perf_counter() - start
        return wrapper

    moe_pipelined.all_to_all_splits = timed(moe_pipelined.all_to_all_splits)
    wait = moe_pipelined._Issue.backward  # the wait for a gradient all-to-all (and Lina's gap after it)
    moe_pipelined._Issue.backward = staticmethod(timed(wait))


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def step(moe, x, bucket, mesh, how: str, piece_bytes: int) -> tuple[float, float, float]:
    """(blocked on all-to-alls in backward, backward, backward + the all-reduce's wait) in seconds."""
    scheduler = AllToAllFirst(piece_bytes) if how == "lina" else None
    moe.comm_priority = scheduler
    y = moe(x).to_local()
    handle = []
    if how == "one collective":
        y.register_hook(lambda g: handle.append(collectives.all_reduce(bucket, mesh, 0, "sum", async_op=True)))
    elif how == "lina":
        y.register_hook(lambda g: handle.append(scheduler(bucket, mesh, 0)))
    loss = (y * y).mean()
    dist.barrier()
    BLOCKED[0] = 0.0
    start = time.perf_counter()
    loss.backward()
    backward = time.perf_counter() - start
    blocked = BLOCKED[0]
    for pending in handle:
        pending.wait()
    moe.zero_grad()
    return blocked, backward, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=16)
    parser.add_argument("--piece-kb", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    ep, rank = dist.get_world_size(), dist.get_rank()
    mesh = dtp.init_device_mesh("cpu", (ep,), mesh_dim_names=("ep",))
    torch.manual_seed(0)
    base = MoE(args.dim, args.hidden, args.experts, args.top_k, dispatch_chunks=args.chunks)
    moe = expert_parallel(replicate(copy.deepcopy(base), mesh, "ep"), mesh, ep_mesh_dim="ep")
    x = dtp.distribute_tensor(torch.randn(ep, args.tokens, args.dim), mesh, [Shard(0)], src_data_rank=None)
    x.requires_grad_()
    bucket = torch.randn(int(args.bucket_mb * 2**20) // 4)
    install_timers()
    ways = ("alone", "one collective", "lina")
    results = {how: [] for how in ways}
    for _ in range(args.rounds):
        for how in ways:
            runs = [step(moe, x, bucket, mesh, how, args.piece_kb * 1024) for _ in range(args.repeats + 1)][1:]
            results[how].append(tuple(slowest(statistics.median(r[i] for r in runs)) for i in range(3)))
    if rank == 0:
        print(f"MoE D={args.dim} F={args.hidden} E={args.experts} top-{args.top_k}, ep=dp={ep}, {args.tokens} tokens/rank, "
              f"{args.chunks} chunks, a {args.bucket_mb:g} MiB bucket handed over as the MoE's backward starts, Lina pieces "
              f"{args.piece_kb} KiB (CPU, gloo); medians of {args.rounds} alternating rounds x {args.repeats}, slowest rank")
        for how in ways:
            blocked, backward, total = (statistics.median(r[i] for r in results[how]) for i in range(3))
            print(f"{how:>15}: backward blocked on all-to-alls {blocked * 1e3:.1f} ms, backward {backward * 1e3:.1f} ms, "
                  f"with the all-reduce's wait {total * 1e3:.1f} ms")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Tutel's ep/dp switch (``MoE.expert_mode``): for a routing, the bytes and the time of a step run expert-parallel
(tokens all-to-all) and data-parallel over experts (weights all-gathered, gradients reduce-scattered), beside
the byte comparison ``expert_mode="auto"`` makes (moe_switch.choose_mode, Janus's formula).

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 4 benchmarks/moe_switch.py

``MoE(D, F, E, k)`` (dropless) on a 1-D ``ep`` mesh, the same weights and tokens in both modes. Routings: the
router at init (near even) and skewed (the gate's first two columns scaled, most tokens to experts 0 and 1,
both on ep rank 0), each at a few token counts per rank. Per row, rank 0 prints: the most bytes any rank sent
in one forward+backward in each mode (measured by ``comm_mode``: all-to-all, all-gather, reduce-scatter), the
formula's two numbers (what the busiest rank sends moving tokens, ``2 (T + max_load (ep-2)) / ep`` rows of D;
moving experts, ``2 (ep-1) L P``; x 4 B), what "auto" picks, and the median forward+backward time of each mode (slowest rank).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.distributed as dist

import dtensor_plus as dtp
from dtensor_plus import Shard
from dtensor_plus.layouts.data import replicate
from dtensor_plus.layouts.moe import MoE, expert_parallel
from dtensor_plus.layouts.moe_balance import expert_moving_bytes
from dtensor_plus.layouts.moe_switch import token_bytes


def most(value: float) -> float:
    t = torch.tensor([float(value)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def run(moe, x, mode: str, repeats: int) -> tuple[float, float]:
    """(most bytes sent by a rank in one step, median step seconds of the slowest rank) in ``mode``."""
    moe.expert_mode = mode
    with dtp.comm_mode() as comm:
        (moe(x) ** 2).mean().backward()
    moe.zero_grad()
    sent = sum(comm.bytes(c) for c in ("all_to_all", "all_gather", "reduce_scatter"))
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        (moe(x) ** 2).mean().backward()
        times.append(time.perf_counter() - start)
        moe.zero_grad()
    return most(sent), most(statistics.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 1024, 4096], help="tokens per rank")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    ep, rank = dist.get_world_size(), dist.get_rank()
    mesh = dtp.init_device_mesh("cpu", (ep,), mesh_dim_names=("ep",))
    L, P = args.experts // ep, 2 * args.dim * args.hidden
    lines = []
    for routing in ("even", "skewed"):
        torch.manual_seed(0)
        base = MoE(args.dim, args.hidden, args.experts, args.top_k)
        if routing == "skewed":
            base.router.gate.weight.data[:2] *= 50
        moe = expert_parallel(replicate(copy.deepcopy(base), mesh, "ep"), mesh, ep_mesh_dim="ep")
        for tokens in args.tokens:
            x = dtp.distribute_tensor(torch.randn(ep, tokens, args.dim), mesh, [Shard(0)], src_data_rank=None)
            x.requires_grad_()  # as inside a model: the dispatch's backward all-to-all runs too
            ep_bytes, ep_s = run(moe, x, "ep", args.repeats)
            dp_bytes, dp_s = run(moe, x, "dp", args.repeats)
            moe.expert_mode = "auto"
            with torch.no_grad():
                moe(x)
            lines.append(f"{routing:>6} {tokens:>5} tok/rank: ep {ep_bytes / 1e6:.2f} MB {ep_s * 1e3:.1f} ms | dp "
                         f"{dp_bytes / 1e6:.2f} MB {dp_s * 1e3:.1f} ms | formula tokens "
                         f"{token_bytes(moe.load, moe.expert_slot.to_local(), ep, args.dim) / 1e6:.2f} MB, experts "
                         f"{expert_moving_bytes(L, P, ep) / 1e6:.2f} MB -> auto picks {moe.mode}")
    if rank == 0:
        print(f"MoE D={args.dim} F={args.hidden} E={args.experts} top-{args.top_k}, ep={ep} (CPU, gloo); bytes: the most "
              f"a rank sent in one fwd+bwd; time: median of {args.repeats}, slowest rank")
        print("\n".join(lines))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""One mixture-of-experts layer under expert parallelism: all-to-all bytes against the analytic figure, load
imbalance, step time and memory per rank, beside one device; on a GPU, the grouped GEMM against a loop.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 4 benchmarks/moe.py
    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 8 benchmarks/moe.py --tokens 512

``MoE(D, F, E, k)`` (dropless) on a 1-D mesh whose only dim is both data parallel and ep: each rank routes its
own ``--tokens`` tokens (B=1, T=tokens), E/ep experts per rank. Rank 0 prints:

- the dispatch all-to-all's bytes (rows sent to other ranks, summed over ranks) against
  tokens·D·k·(ep-1)/ep·4 per rank (the DESIGN.md all-to-all figure for a local buffer of tokens·k rows of D
  fp32): the ratio is 1.00 when the router spreads every rank's assignments evenly over the ranks; a random
  router at init is near it. Forward moves rows twice (dispatch, combine) and backward twice more; the
  counts exchange adds E int64 per rank;
- load imbalance: the busiest expert's assignments over the mean (1.00 is perfect balance);
- forward + backward + AdamW step time (median of --repeats, slowest rank) and the one-device time of the
  same layer on the whole batch (tokens·ep) with all experts, run by rank 0 alone;
- memory per rank: parameter + AdamW state bytes held (experts 1/ep), and the process's peak RSS;
- on CUDA: ``grouped_mm`` (Triton) against ``grouped_mm_reference`` (a loop of matmuls), forward, same shapes.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time

import torch
import torch.distributed as dist

import dtensor_plus as dtp
from dtensor_plus import Shard
from dtensor_plus.layouts.data import replicate
from dtensor_plus.layouts.moe import MoE, expert_parallel


def step_time(moe, x, repeats: int):
    """Median seconds of forward + backward + AdamW step, and the optimizer (to measure its state)."""
    opt = torch.optim.AdamW(moe.parameters(), lr=1e-3, foreach=False)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        y = moe(x)
        loss = (y * y).mean() + moe.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), opt


def state_bytes(moe, opt) -> int:
    tensors = list(moe.parameters()) + [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum((t._local_tensor if isinstance(t, dtp.DTensor) else t).numel() * t.element_size() for t in tensors)


def bytes_and_load(moe, x, mesh):
    """Row bytes of the forward's dispatch all-to-all (this rank), backward all-to-all bytes, the load."""
    ep, E = mesh.size(0), moe.experts.num_experts
    with dtp.comm_mode() as fwd:
        y = moe(x)
    with dtp.comm_mode() as bwd:
        ((y * y).mean() + moe.aux_loss).backward()
    counts_bytes = (ep - 1) * (E // ep) * 8  # the counts exchange: E/ep int64 to each other rank
    rows_fwd = fwd.bytes("all_to_all") - counts_bytes  # dispatch + combine
    return rows_fwd, bwd.bytes("all_to_all"), moe.load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    ep, rank = dist.get_world_size(), dist.get_rank()
    mesh = dtp.init_device_mesh("cpu", (ep,), mesh_dim_names=("dp",))
    D, k = args.dim, args.top_k
    torch.manual_seed(0)
    single = MoE(D, args.hidden, args.experts, k)
    moe = copy.deepcopy(single)
    replicate(moe, mesh, "dp")
    expert_parallel(moe, mesh, ep_mesh_dim="dp")
    x_whole = torch.randn(ep, args.tokens, D, requires_grad=True)  # as inside a model: the input needs a gradient
    x = dtp.distribute_tensor(x_whole.detach(), mesh, [Shard(0)], src_data_rank=None).requires_grad_()

    rows_fwd, bwd_bytes, load = bytes_and_load(moe, x, mesh)
    totals = torch.tensor([rows_fwd, bwd_bytes], dtype=torch.float64)
    dist.all_reduce(totals)
    seconds, opt = step_time(moe, x, args.repeats)
    slowest = torch.tensor([seconds])
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    held = state_bytes(moe, opt)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dist.barrier()
    if rank == 0:
        one_seconds, one_opt = step_time(single, x_whole, args.repeats)
        one_held = state_bytes(single, one_opt)
        formula = ep * args.tokens * D * k * (ep - 1) / ep * 4  # summed over ranks
        dispatch = totals[0].item() / 2  # dispatch and combine move the same rows, summed over ranks
        print(f"MoE D={D} F={args.hidden} E={args.experts} top-{k}, ep={ep}, {args.tokens} tokens/rank (CPU, gloo)")
        print(f"dispatch all-to-all bytes (all ranks): {dispatch:,.0f}  formula tokens·D·k·(ep-1)/ep·4: "
              f"{formula:,.0f}  ratio {dispatch / formula:.2f}")
        print(f"forward rows moved {totals[0].item():,.0f} B (dispatch + combine), backward {totals[1].item():,.0f} B")
        print(f"load per expert {load.tolist()}  imbalance (max / mean) {load.max().item() / load.float().mean().item():.2f}")
        print(f"step time (fwd+bwd+AdamW, slowest rank): {slowest.item() * 1e3:.1f} ms   one device, "
              f"{ep}x the tokens: {one_seconds * 1e3:.1f} ms")
        print(f"params + AdamW state per rank: {held / 2**20:.2f} MiB (one device: {one_held / 2**20:.2f} MiB);  "
              f"peak RSS rank 0: {rss / 2**20:.0f} MiB")
        grouped_gemm_on_gpu(args)
    dist.barrier()
    dist.destroy_process_group()


def grouped_gemm_on_gpu(args) -> None:
    if not torch.cuda.is_available():
        print("grouped GEMM vs per-expert loop: no CUDA device here (skipped)")
        return
    from dtensor_plus.kernels.grouped_gemm import grouped_mm, grouped_mm_reference

    E, N = args.experts, 8192
    counts = torch.full((E,), N // E, dtype=torch.int32)
    x = torch.randn(N, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, 1024, 4096, device="cuda", dtype=torch.bfloat16)
    for name, fn in (("grouped_mm (Triton)", grouped_mm), ("loop of matmuls", grouped_mm_reference)):
        fn(x, w, counts)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            fn(x, w, counts)
        torch.cuda.synchronize()
        print(f"{name}: {(time.perf_counter() - start) / 20 * 1e3:.3f} ms  (N={N}, K=1024, M=4096, E={E}, bf16)")


if __name__ == "__main__":
    main()

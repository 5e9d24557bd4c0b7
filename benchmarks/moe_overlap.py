"""Exposed communication of the MoE token all-to-all, one all-to-all each way against the dispatch pipelined with
expert compute in chunks (Tutel, PipeMoE / ScheMoE: ``MoE(dispatch_chunks=C)``).

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 4 benchmarks/moe_overlap.py

``MoE(D, F, E, k)`` (dropless) on a 1-D mesh, ep = the data-parallel dim, ``--tokens`` tokens per rank, a
router at init (near even). For each chunk count, in alternating rounds on the same warm ranks (the machine's
load drifts; medians over rounds, slowest rank), rank 0 prints:

- forward time, and the exposed communication in it: the time this rank is blocked on the rows' all-to-alls
  (the synchronous ``all_to_all_splits`` calls with one chunk; the ``wait()`` of the issued ones with C);
- backward time and the exposed communication in it, the same way (with C chunks backward is pipelined too:
  each gradient all-to-all issued, then waited where its rows are needed);
- forward + backward time;
- the all-to-all bytes, which pipelining leaves unchanged.

Timers wrap the library's collective entry points from outside (this file only); nothing in the library
measures time.
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
from dtensor_plus.layouts.data import replicate
from dtensor_plus.layouts import moe_pipelined
from dtensor_plus.layouts.moe import MoE, expert_parallel

BLOCKED = [0.0]  # seconds blocked on row all-to-alls since the last reset (this benchmark's own counter)


def _timed(fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            BLOCKED[0] += time.perf_counter() - start
    return wrapper


def install_timers() -> None:
    # AllToAllSplits calls collectives.all_to_all_splits through the module (the one-chunk rows, both ways);
    # moe_pipelined imported the name: its issuing calls are timed there; the waits of what it issued by the class.
    collectives.all_to_all_splits = _timed(collectives.all_to_all_splits)
    moe_pipelined.all_to_all_splits = _timed(moe_pipelined.all_to_all_splits)
    collectives.PendingCollective.wait = _timed(collectives.PendingCollective.wait)


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def measure(moe, x, repeats: int) -> tuple[float, ...]:
    """Median (forward s, blocked s in forward, forward+backward s, backward s, blocked s in backward) over
    ``repeats``, slowest rank each."""
    fwd, blocked, step, bwd, bwd_blocked = [], [], [], [], []
    for _ in range(repeats + 1):
        dist.barrier()
        BLOCKED[0] = 0.0
        start = time.perf_counter()
        y = moe(x)
        fwd.append(time.perf_counter() - start)
        blocked.append(BLOCKED[0])
        loss = (y * y).mean()
        BLOCKED[0] = 0.0
        back_start = time.perf_counter()
        loss.backward()
        bwd.append(time.perf_counter() - back_start)
        bwd_blocked.append(BLOCKED[0])
        step.append(time.perf_counter() - start)
        moe.zero_grad()
    return tuple(slowest(statistics.median(v[1:])) for v in (fwd, blocked, step, bwd, bwd_blocked))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    ep, rank = dist.get_world_size(), dist.get_rank()
    mesh = dtp.init_device_mesh("cpu", (ep,), mesh_dim_names=("ep",))
    torch.manual_seed(0)
    base = MoE(args.dim, args.hidden, args.experts, args.top_k)
    moe = expert_parallel(replicate(copy.deepcopy(base), mesh, "ep"), mesh, ep_mesh_dim="ep")
    x = dtp.distribute_tensor(torch.randn(ep, args.tokens, args.dim), mesh, [Shard(0)], src_data_rank=None)
    x.requires_grad_()
    install_timers()
    results = {c: [] for c in args.chunks}
    sent = {}
    for _ in range(args.rounds):
        for c in args.chunks:
            moe.dispatch_chunks = c
            results[c].append(measure(moe, x, args.repeats))
            with dtp.comm_mode() as comm:
                moe(x)
            sent[c] = comm.bytes("all_to_all")
    if rank == 0:
        print(f"MoE D={args.dim} F={args.hidden} E={args.experts} top-{args.top_k}, ep={ep}, {args.tokens} tokens/rank "
              f"(CPU, gloo); medians of {args.rounds} alternating rounds x {args.repeats} steps, slowest rank")
        base_fwd = statistics.median(r[0] for r in results[args.chunks[0]])
        for c in args.chunks:
            fwd, blocked, step, bwd, bwd_blocked = (statistics.median(r[i] for r in results[c]) for i in range(5))
            print(f"chunks {c}: forward {fwd * 1e3:.1f} ms (x{base_fwd / fwd:.2f} vs {args.chunks[0]}), blocked on "
                  f"all-to-alls {blocked * 1e3:.1f} ms ({blocked / fwd:.0%} of forward); backward {bwd * 1e3:.1f} ms, "
                  f"blocked {bwd_blocked * 1e3:.1f} ms ({bwd_blocked / bwd:.0%} of backward); fwd+bwd {step * 1e3:.1f} ms, "
                  f"forward all-to-all bytes (rank 0) {sent[c]:,.0f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

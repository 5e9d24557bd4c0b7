"""Sequence-parallel attention schemes side by side: bytes per rank and mesh dim, and per-rank attention work
(max / mean over ranks), measured, beside each paper's figure; time of forward + backward (slowest rank).

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 4 benchmarks/sequence_parallel_schemes.py
    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 8 benchmarks/sequence_parallel_schemes.py

Causal F.scaled_dot_product_attention on (B, H, S, D) fp32 q and (B, Hkv, S, D) k, v (GQA), every scheme on
all ranks of the world:

    scheme        mesh                      layout of q, k, v
    ring          (n,) "cp"                 Shard(2)                                      (Liu et al.)
    zigzag        (n,) "cp"                 StridedShard(2, 1, zigzag=True)               (Brandon et al., ring-flash)
    striped       (n,) "cp"                 striped_placement(2, S, n)                    (Brandon et al.)
    distflash     (n,) "cp"                 Shard(2), idle ranks take far blocks          (Li et al.)
    ulysses       (n,) "cp"                 Shard(2), all-to-all to heads                 (Jacobs et al.)
    usp           (n/2, 2) ring x ulysses   [Shard(2), Shard(2)]                          (Fang & Zhao)
    double_ring   (2, n/2) outer x inner    [Shard(2), Shard(2)]                          (Gu et al.)
    loongtrain    (2, 2, 2) outer x inner x ulysses (8 ranks only)

Work: the attention scores each rank's kernels compute in the forward (a full pair t x s, a causal diagonal
t(t+1)/2), times B*H; the ring family counted at its block kernel, Ulysses by its formula (every rank the
whole causal triangle on H/n heads). The papers' figures: the plain causal ring's max/mean is (2n-1)/n in
scores (2n/(n+1) in blocks, a diagonal counted whole); zigzag exactly 1; striped 1 + O(n/S); DistFlashAttn's balanced schedule at most ceil((n+1)/2) blocks a
rank (one a causal diagonal) over a mean of (n+1)/2; its bytes: n/2 k/v blocks, plus q blocks out and
(out, lse) back for the far pairs.
Bytes: ring family (n-1) k/v blocks forward per rank; Ulysses 4 tensors x (n-1)/n of the local block; USP
the two on their own mesh dims; the double ring's slow (outer) links carry m-1 of the n-1 blocks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dtensor_plus as dtp
from dtensor_plus import Shard
from dtensor_plus.layouts import context_parallel, striped_placement

sys.path.insert(0, str(Path(__file__).resolve().parent))
from context_parallel import timed  # noqa: E402  (the median step on the slowest rank, as the ring's benchmark times it)
from dtensor_plus.ops import distflash_attention, ring_attention
from dtensor_plus.ops.distflash_attention import distflash_blocks
from dtensor_plus.placements import StridedShard


def counting_kernel(counter: list):
    """ring_attention's block kernel, counting forward attention scores (times batch and heads) into counter."""
    kernel = ring_attention._block_forward

    def call(query, key, value, causal, scale):
        t, s = query.shape[2], key.shape[2]
        counter[0] += query.shape[0] * query.shape[1] * (t * (t + 1) // 2 if causal else t * s)
        return kernel(query, key, value, causal, scale)

    return call


def schemes(world: int):
    """(name, mesh shape, mesh dim names, placements, context_parallel arguments)."""
    n = world
    yield "ring", (n,), ("cp",), lambda S: [Shard(2)], dict(mesh_dim="cp")
    yield "zigzag", (n,), ("cp",), lambda S: [StridedShard(2, 1, zigzag=True)], dict(mesh_dim="cp")
    yield "striped", (n,), ("cp",), lambda S: [striped_placement(2, S, n)], dict(mesh_dim="cp")
    yield "distflash", (n,), ("cp",), lambda S: [Shard(2)], dict(mesh_dim="cp", load_balance="distflash")
    yield "ulysses", (n,), ("cp",), lambda S: [Shard(2)], dict(mesh_dim="cp", kind="ulysses")
    yield "usp", (n // 2, 2), ("ring", "ulysses"), lambda S: [Shard(2)] * 2, dict(mesh_dim=("ring", "ulysses"), kind="usp")
    yield "double_ring", (2, n // 2), ("outer", "inner"), lambda S: [Shard(2)] * 2, dict(mesh_dim=("outer", "inner"),
                                                                                          kind="double_ring")
    if world == 8:
        yield "loongtrain", (2, 2, 2), ("outer", "inner", "ulysses"), lambda S: [Shard(2)] * 3, dict(
            mesh_dim=("outer", "inner", "ulysses"), kind="loongtrain")


def reference_bytes(name, n, B, H, Hkv, S, D) -> dict:
    """The papers' forward bytes by mesh dim, of the rank that sends most (fp32; S, H divisible as the
    benchmark's sizes are)."""
    kv_block = 2 * B * Hkv * (S // n) * D * 4
    if name == "distflash":
        half, q_block, result = n // 2, B * H * (S // n) * D * 4, B * H * (S // n) * (D + 1) * 4
        far = range(half + 1, n)
        return {"cp": max(half * kv_block + sum(k >= d for d in far) * q_block + sum(k + d < n for d in far) * result
                          for k in range(n))}
    if name in ("ring", "zigzag", "striped"):
        return {"cp": (n - 1) * kv_block}
    if name == "ulysses":
        return {"cp": (n - 1) * B * (S // n) * D * 4 * (2 * H + 2 * Hkv) // n}
    if name == "usp":
        r, u = n // 2, 2
        return {"ulysses": (u - 1) * B * (S // n) * D * 4 * (2 * H + 2 * Hkv) // u,
                "ring": (r - 1) * 2 * B * (Hkv // u) * (S // r) * D * 4}
    if name == "double_ring":
        m, w = 2, n // 2
        return {"inner": m * (w - 1) * kv_block, "outer": (m - 1) * kv_block}
    m, w, u = 2, 2, 2  # loongtrain
    ring_block = 2 * B * (Hkv // u) * (S // (m * w)) * D * 4
    return {"inner": m * (w - 1) * ring_block, "outer": (m - 1) * ring_block,
            "ulysses": (u - 1) * B * (S // n) * D * 4 * (2 * H + 2 * Hkv) // u}


def run_scheme(whole, mesh, placements, cp_args, repeats):
    q, k, v = (dtp.distribute_tensor(t, mesh, placements, src_data_rank=None).requires_grad_() for t in whole)
    grad = dtp.distribute_tensor(torch.ones_like(whole[0]), mesh, placements, src_data_rank=None)
    counter = [0]
    kernel = ring_attention._block_forward
    ring_attention._block_forward = distflash_attention._block_forward = counting_kernel(counter)
    try:
        with context_parallel(**cp_args):
            with dtp.comm_mode() as forward:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            with dtp.comm_mode() as backward:
                out.backward(grad)
    finally:
        ring_attention._block_forward = distflash_attention._block_forward = kernel

    def step():
        with context_parallel(**cp_args):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(grad)

    return forward, backward, counter[0], timed(step, repeats)


def gathered(value: float) -> list[float]:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    n, rank0 = dist.get_world_size(), dist.get_rank() == 0
    if n not in (4, 8):  # the 2-D schemes need an even split of at least 2 x 2 ranks
        raise SystemExit(f"sequence_parallel_schemes runs on 4 or 8 ranks (--nproc-per-node 4 or 8), not {n}")
    say = print if rank0 else (lambda *a, **k: None)
    B, H, Hkv, S, D = args.batch, args.heads, args.kv_heads, args.seq, args.head_dim
    gen = torch.Generator().manual_seed(0)
    whole = [torch.randn(B, h, S, D, generator=gen) for h in (H, Hkv, Hkv)]
    triangle = B * H * S * (S + 1) // 2
    say(f"causal SDPA fwd+bwd, (B, H, Hkv, S, D) = ({B}, {H}, {Hkv}, {S}, {D}), fp32, {n} ranks (gloo, CPU)")
    say(f"{'scheme':12} {'mesh dim':9} {'fwd bytes':>10} {'paper':>10} {'ratio':>5} {'bwd bytes':>10} "
        f"{'work max/mean':>13} {'paper':>6} {'ms':>8}")
    for name, shape, names, placements, cp_args in schemes(n):
        mesh = dtp.init_device_mesh("cpu", shape, mesh_dim_names=names)
        forward, backward, scores, ms = run_scheme(whole, mesh, placements(S), cp_args, args.repeats)
        if name == "ulysses":  # not the ring's kernel: every rank the whole triangle on its H/n heads
            scores = triangle // n
        work = gathered(scores)
        imbalance = max(work) / statistics.mean(work)
        ring_ranks = {"ring": n, "usp": n // 2, "double_ring": n, "loongtrain": 4}.get(name)  # plain causal rings
        # the plain causal ring of r ranks: the last computes r-1 full blocks and a diagonal, the mean (r-1)/2 and one
        paper_imbalance = (2 * ring_ranks - 1) / ring_ranks if ring_ranks else 1.0
        if name == "distflash":  # in scores: each rank's blocks, one of them a causal diagonal (half a block)
            schedule = [b - 0.5 for b in distflash_blocks(n)]
            paper_imbalance = max(schedule) / statistics.mean(schedule)
        assert sum(work) == triangle, (name, work, triangle)  # the causal triangle, each score once
        for dim, paper in reference_bytes(name, n, B, H, Hkv, S, D).items():
            fwd = max(gathered(sum(b for c, b in forward.sent_bytes.items() if c[1] == dim)))
            bwd = max(gathered(sum(b for c, b in backward.sent_bytes.items() if c[1] == dim)))
            say(f"{name:12} {dim:9} {fwd / 1024:9.0f}K {paper / 1024:9.0f}K {fwd / paper:5.2f} {bwd / 1024:9.0f}K "
                f"{imbalance:13.2f} {paper_imbalance:6.2f} {ms:8.1f}")

if __name__ == "__main__":
    main()
    dist.destroy_process_group()

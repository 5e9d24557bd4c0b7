"""Topology-aware dispatch (TA-MoE; Tutel's 2-D hierarchical all-to-all) against the flat one: what crosses between
nodes, in how many messages, and what the extra hop costs.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 4 benchmarks/moe_hierarchical.py --nodes 2

The same ``MoE(D, F, E, k)`` (dropless, a router at init) on the same tokens, its experts sharded over the world
two ways: flat, one ``ep`` mesh dim; hierarchical, ``("ep_inter", "ep_intra")`` = (nodes, ranks per node),
``expert_parallel(ep_mesh_dim=("ep_inter", "ep_intra"))``. Ranks ``n G .. (n+1) G - 1`` form node n. Rank 0
prints, per dispatch, from the split sizes of every row all-to-all of one forward (recorded by wrapping
``collectives.all_to_all_splits`` from outside), summed over all ranks: the bytes sent to other nodes and the
messages that carry them (non-empty sends to a rank of another node), the bytes sent inside a node; and the
median forward+backward time (slowest rank). The formula: both dispatches send the same bytes between nodes (a row
crosses at most once); the flat one in up to ``G (M-1)`` messages per rank each way, the hierarchical one in
up to ``M-1``. One CPU machine has no slow link between "nodes": the time shows what the second hop costs
here, not what it saves on a cluster.
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
from dtensor_plus.layouts.moe import MoE, expert_parallel

CALLS: list = []  # (mesh dim name, send splits, bytes per row) of each row all-to-all since the last reset


def install_recorder() -> None:
    inner = collectives.all_to_all_splits

    def recorded(t, mesh, mesh_dim, send_splits, recv_splits, **kwargs):
        if t.is_floating_point():  # rows, not the int64 counts
            row_bytes = t[0].numel() * t.element_size() if t.shape[0] else 0
            CALLS.append((mesh.mesh_dim_name(mesh_dim), [int(s) for s in send_splits], row_bytes))
        return inner(t, mesh, mesh_dim, send_splits, recv_splits, **kwargs)

    collectives.all_to_all_splits = recorded


def traffic(rank: int, per_node: int) -> tuple[int, int, int]:
    """(bytes to other nodes, messages to other nodes, bytes inside the node) this rank sent in CALLS."""
    node, position = divmod(rank, per_node)
    across = messages = inside = 0
    for name, splits, row_bytes in CALLS:
        for peer, rows in enumerate(splits):
            if name == "ep":  # flat: peer is the ep rank
                other_node, same_rank = peer // per_node != node, peer == rank
            elif name == "ep_inter":  # peer is the node, at my position
                other_node, same_rank = peer != node, peer == node
            else:  # ep_intra: peer is a position in my node
                other_node, same_rank = False, peer == position
            if same_rank or not rows:
                continue
            if other_node:
                across, messages = across + rows * row_bytes, messages + 1
            else:
                inside += rows * row_bytes
    return across, messages, inside


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    per_node = world // args.nodes
    if per_node * args.nodes != world:
        raise SystemExit(f"--nodes {args.nodes} does not divide the {world} ranks")
    torch.manual_seed(0)
    base = MoE(args.dim, args.hidden, args.experts, args.top_k)
    flat_mesh = dtp.init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    two_d = dtp.init_device_mesh("cpu", (args.nodes, per_node), mesh_dim_names=("ep_inter", "ep_intra"))
    layouts = {
        "flat": (expert_parallel(dtp.distribute_module(copy.deepcopy(base), flat_mesh), flat_mesh, ep_mesh_dim="ep"),
                 flat_mesh, [Shard(0)]),
        "hierarchical": (expert_parallel(dtp.distribute_module(copy.deepcopy(base), two_d), two_d,
                                         ep_mesh_dim=("ep_inter", "ep_intra")), two_d, [Shard(0), Shard(0)]),
    }
    tokens = torch.randn(world, args.tokens, args.dim)
    install_recorder()
    rows = {}
    for name, (moe, mesh, placements) in layouts.items():
        x = dtp.distribute_tensor(tokens, mesh, placements, src_data_rank=None).requires_grad_()
        CALLS.clear()
        moe(x)
        sent = torch.tensor(traffic(rank, per_node), dtype=torch.float64)
        dist.all_reduce(sent)  # over all ranks
        sent = [int(v) for v in sent.tolist()]
        times = []
        for _ in range(args.repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            (moe(x) ** 2).mean().backward()
            times.append(time.perf_counter() - start)
            moe.zero_grad()
        rows[name] = (*sent, slowest(statistics.median(times[1:])))
    if rank == 0:
        print(f"MoE D={args.dim} F={args.hidden} E={args.experts} top-{args.top_k}, {args.nodes} nodes x {per_node} "
              f"ranks, {args.tokens} tokens/rank (CPU, gloo); one forward's sends, all ranks; fwd+bwd median of "
              f"{args.repeats}, slowest rank")
        for name, (across, messages, inside, seconds) in rows.items():
            print(f"{name:>12}: to other nodes {across:,} B in {messages} messages, inside the node {inside:,} B; "
                  f"fwd+bwd {seconds * 1e3:.1f} ms")
        print(f"formula: the same bytes between nodes; messages to other nodes, all ranks, dispatch and combine, at "
              f"most 2 n G (M-1) = {2 * world * per_node * (args.nodes - 1)} flat, 2 n (M-1) = "
              f"{2 * world * (args.nodes - 1)} hierarchical")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

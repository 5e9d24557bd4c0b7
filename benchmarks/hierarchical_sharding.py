"""Hierarchical sharding (HSDP / MiCS, layouts/zero_hybrid.py) against ZeRO-3 over every rank: the bytes one rank
sends per step on each mesh dim (link level), measured by ``comm_mode``, beside MiCS's formulas, and what they cost
on a two-level network.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 4 benchmarks/hierarchical_sharding.py
    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 8 benchmarks/hierarchical_sharding.py

Layouts, each a fresh GPT (same seed and batches), one step measured after one warm step:
  zero-3 dp=N         fully_shard on a 1-D mesh of all N ranks;
  hsdp r x p          fully_shard(mesh_dim=("replicate", "shard")) on an (r, p) mesh, for every r, p > 1;
  hsdp r x p, k mb    the same with k microbatches per step, the replicas synchronized by the last only
                      (set_requires_all_reduce: MiCS's two-hop gradient synchronization);
  FSDP2 hsdp r x p    PyTorch's own (torch.distributed.fsdp.fully_shard on a 2-D DeviceMesh), its
                      torch.distributed calls counted the same way (no formula column: its backward re-gathers
                      every parameter, not only the saved ones, and it all-reduces padded shards).
MiCS's formulas, per rank per step, B the parameter bytes padded to p pieces (torch.chunk's) and B_saved those
of the parameters autograd saved (gathered again in backward), G = B in fp32:
  shard dim      all-gather k (p-1)/p (B + B_saved), reduce-scatter k (p-1)/p G
  replicate dim  all-reduce 2 (r-1)/r G/p (this rank's piece, unpadded)
plus the loss (not ZeRO's): one fp32 scalar all-reduced per microbatch on each mesh dim of n ranks, 2 (n-1)/n 4 B.
ZeRO-3 over N is the same with p = N, r = 1. "time at 2 levels": the bytes over each mesh dim's link, alpha-beta
without latency, with the shard group inside one node (intra_gbps) and the replicate dim across nodes
(inter_gbps); ZeRO-3's collectives span nodes, so run at inter_gbps (a ring is as fast as its slowest link).
Defaults are MiCS's testbed (AWS p3dn: NVLink inside a node, 100 Gb/s between nodes).
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import dtensor_plus as dtp  # noqa: E402
from dtensor_plus import Shard  # noqa: E402
from dtensor_plus.layouts import fully_shard  # noqa: E402
from dtensor_plus.layouts.zero_hybrid import set_requires_all_reduce  # noqa: E402
from gpt import GPT, PRESETS  # noqa: E402

BATCH_PER_RANK = 2


def layouts(world: int, microbatches: int) -> list[tuple[str, tuple[int, int], int]]:
    """(name, (r, p), microbatches) for ZeRO-3 and every HSDP factorization of ``world``."""
    out = [(f"zero-3 dp={world}", (1, world), 1), (f"zero-3 dp={world}, {microbatches} mb", (1, world), microbatches)]
    for r in range(2, world):
        if world % r == 0 and world // r > 1:
            p = world // r
            out.append((f"hsdp {r}x{p}", (r, p), 1))
            out.append((f"hsdp {r}x{p}, {microbatches} mb", (r, p), microbatches))
    return out


def place(model, shape):
    r, p = shape
    if r == 1:
        mesh = dtp.init_device_mesh("cpu", (p,), mesh_dim_names=("shard",))
        mesh_dim, batch = "shard", [Shard(0)]
    else:
        mesh = dtp.init_device_mesh("cpu", (r, p), mesh_dim_names=("replicate", "shard"))
        mesh_dim, batch = ("replicate", "shard"), [Shard(0), Shard(0)]
    dtp.distribute_module(model, mesh)  # the causal masks too: fully_shard places only parameters
    for block in model.blocks:
        fully_shard(block, mesh, mesh_dim=mesh_dim)
    fully_shard(model, mesh, mesh_dim=mesh_dim)
    return mesh, batch


def one_step(model, opt, mesh, batch, tokens_list, hsdp: bool):
    for i, tokens in enumerate(tokens_list):
        if hsdp:
            set_requires_all_reduce(model, i == len(tokens_list) - 1)
        x, y = (dtp.distribute_tensor(t, mesh, batch, src_data_rank=None) for t in (tokens[:, :-1], tokens[:, 1:]))
        model.loss(x, y).backward()
    opt.step()
    opt.zero_grad()


def saved_names(model) -> set[str]:
    """The parameters autograd keeps for backward in this GPT (so backward gathers them again): every weight of
    a Linear or LayerNorm (the input gradient needs it) and LayerNorm's bias (aten's layer-norm backward takes
    it); not the Linears' biases, not the embeddings."""
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    return {n for n, _ in model.named_parameters()
            if (n.endswith("weight") and "emb" not in n) or n.rsplit(".", 1)[0] in norms}


def formula(model, shape, microbatches, shard_index, saved) -> dict:
    r, p = shape

    def piece(t, index=None):
        rows = math.ceil(t.shape[0] / p)
        if index is not None:
            rows = max(0, min(t.shape[0], (index + 1) * rows) - index * rows)
        return rows * math.prod(t.shape[1:]) * t.element_size()

    padded = sum(piece(t) for t in model.parameters())
    padded_saved = sum(piece(t) for n, t in model.named_parameters() if n in saved)
    mine = sum(piece(t, shard_index) for t in model.parameters())
    out = {("all_gather", "shard"): microbatches * (p - 1) * (padded + padded_saved),
           ("reduce_scatter", "shard"): microbatches * (p - 1) * padded}
    # The loss: its fp32 sum over the global batch all-reduced on each mesh dim, once per microbatch.
    out["all_reduce", "shard"] = microbatches * 2 * (p - 1) * 4 // p
    if r > 1:
        out["all_reduce", "replicate"] = 2 * (r - 1) * mine // r + microbatches * 2 * (r - 1) * 4 // r
    return out


def measure(config, shape, microbatches, seed=0) -> tuple[dict, dict]:
    torch.manual_seed(seed)
    model = GPT(config)
    reference = GPT(config)  # unplaced: the shapes for the formula
    reference.load_state_dict(model.state_dict())
    mesh, batch = place(model, shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    rows = BATCH_PER_RANK * dist.get_world_size()
    steps = [[torch.randint(0, config.vocab_size, (rows, config.block_size + 1), generator=g)
              for _ in range(microbatches)] for _ in range(2)]
    one_step(model, opt, mesh, batch, steps[0], shape[0] > 1)  # warm: records the units' order
    with dtp.comm_mode() as comm:
        one_step(model, opt, mesh, batch, steps[1], shape[0] > 1)
    measured = {key: comm.bytes(*key) for key in comm.sent_bytes}
    want = formula(reference, shape, microbatches, mesh.get_local_rank("shard"), saved_names(reference))
    return measured, want


class TorchBytes:
    """FSDP2's collectives counted as comm_mode counts ours (bytes this rank sends: (n-1) pieces per all-gather and
    reduce-scatter, 2(n-1)/n per all-reduce), by mesh dim, by wrapping the torch.distributed calls FSDP2 makes."""

    NAMES = {"all_gather_single": "all_gather", "reduce_scatter_single": "reduce_scatter", "all_reduce": "all_reduce"}

    def __init__(self, groups: dict):
        self.groups, self.sent, self.saved = groups, {}, {}

    def __enter__(self):
        for name in self.NAMES:
            self.saved[name] = getattr(dist, name)
            setattr(dist, name, self._counted(name, self.saved[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)

    def _counted(self, name, fn):
        signature = inspect.signature(fn)

        def counted(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            group = bound.get("group")
            n = dist.get_world_size(group)
            if name == "all_reduce":
                sent = 2 * (n - 1) * bound["tensor"].numel() * bound["tensor"].element_size() // n
            else:  # the all-gather's input, the reduce-scatter's output: one piece
                piece = bound["input_tensor"] if name == "all_gather_single" else bound["output"]
                sent = (n - 1) * piece.numel() * piece.element_size()
            key = (self.NAMES[name], self.groups.get(group, "?"))
            self.sent[key] = self.sent.get(key, 0) + sent
            return fn(*args, **kwargs)
        return counted


def measure_fsdp2(config, shape, seed=0) -> tuple[dict, dict]:
    """FSDP2's HSDP (torch fully_shard on a 2-D DeviceMesh, reshard after forward) on the same GPT and step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    torch.manual_seed(seed)
    model = GPT(config)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    for block in model.blocks:
        torch_fully_shard(block, mesh=mesh)
    torch_fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    groups = {mesh.get_group(name): name for name in ("replicate", "shard")}
    for step in range(2):
        tokens = torch.randint(0, config.vocab_size, (BATCH_PER_RANK, config.block_size + 1), generator=g)
        with TorchBytes(groups) as counted:
            model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
            opt.step()
            opt.zero_grad()
    return counted.sent, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="debug", choices=sorted(PRESETS))
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--intra-gbps", type=float, default=2400.0, help="inside a node, Gb/s (NVLink: 300 GB/s)")
    parser.add_argument("--inter-gbps", type=float, default=100.0, help="between nodes, Gb/s (MiCS: 100)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    config = PRESETS[args.config]
    rows = []
    for name, shape, microbatches in layouts(world, args.microbatches):
        measured, want = measure(config, shape, microbatches)
        every = [None] * world
        dist.all_gather_object(every, (measured, want))
        rows.append((name, shape, microbatches, every))
        if shape[0] > 1 and microbatches == 1:  # PyTorch's own HSDP beside ours
            measured = measure_fsdp2(config, shape)
            every = [None] * world
            dist.all_gather_object(every, measured)
            rows.append((f"FSDP2 hsdp {shape[0]}x{shape[1]}", shape, 1, every))
    if rank == 0:
        report(rows, args, world, config)
    dist.destroy_process_group()


def report(rows, args, world, config) -> None:
    intra, inter = args.intra_gbps * 1e9 / 8, args.inter_gbps * 1e9 / 8
    print(f"GPT {args.config} ({sum(p.numel() for p in GPT(config).parameters())} parameters, fp32), {world} ranks, "
          f"{BATCH_PER_RANK} sequences per rank per microbatch; bytes one rank sends per step, the largest over ranks")
    print(f"{'layout':<22} {'mesh dim':<10} {'collective':<15} {'measured B':>11} {'MiCS formula':>13} {'ratio':>6}")
    for name, (r, p), microbatches, every in rows:
        keys = sorted({k for measured, want in every for k in (*measured, *want)})
        seconds = 0.0
        for key in keys:
            got = max(m.get(key, 0) for m, _ in every)
            want = max(w.get(key, 0) for _, w in every)
            ratio = f"{got / want:.3f}" if want else "-"
            print(f"{name:<22} {key[1]:<10} {key[0]:<15} {got:>11} {want if want else '-':>13} {ratio:>6}")
            link = inter if (r == 1 or key[1] == "replicate") else intra
            seconds += got / link
        print(f"{name:<22} time at 2 levels ({args.intra_gbps:g} / {args.inter_gbps:g} Gb/s): {seconds * 1e6:.1f} us")


if __name__ == "__main__":
    main()

"""A striped causal attention block with nn.Linear q/k/v/o projections: bytes per rank and time of forward +
backward (slowest rank), three ways on the same striped activation (token t on rank t mod n):

    linear     plain nn.Linear: the view rules keep the stripes through the (B, T) fold and back
    bmm        x @ W as one bmm of W expanded over the batch (the tests' former workaround: no fold at all)
    gathered   x gathered to Replicate before the block (what the fold cost before the split rule: every rank
               holds the whole sequence and computes the whole attention; no ring)

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 4 benchmarks/striped_linear_views.py

Beside the ring's formula: forward (n-1) shifts of this rank's k and v blocks, 2 * B * (T/n) * C * 4 bytes
each; backward twice that (k, v again and their gradients).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dtensor_plus as dtp
from dtensor_plus.layouts import context_parallel, striped_placement


class Block(nn.Module):
    def __init__(self, channels: int, heads: int, projection: str):
        super().__init__()
        self.heads, self.projection = heads, projection
        self.q, self.k, self.v, self.o = (nn.Linear(channels, channels) for _ in range(4))

    def project(self, layer: nn.Linear, x):
        if self.projection == "bmm":
            return torch.bmm(x, layer.weight.t().expand(x.shape[0], -1, -1)) + layer.bias
        return layer(x)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (self.project(p, x).view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.project(self.o, y.transpose(1, 2).reshape(b, t, c))


def run(way: str, whole: torch.Tensor, mesh, heads: int, repeats: int):
    n = mesh.size(0)
    torch.manual_seed(0)
    model = Block(whole.shape[-1], heads, "bmm" if way == "bmm" else "linear")
    for layer in (model.q, model.k, model.v, model.o):
        for name, p in list(layer.named_parameters()):
            setattr(layer, name, nn.Parameter(dtp.distribute_tensor(p.detach(), mesh, [dtp.Replicate()])))
    x = dtp.distribute_tensor(whole, mesh, [striped_placement(1, whole.shape[1], n)])
    if way == "gathered":
        x = x.redistribute(mesh, [dtp.Replicate()])
    x.requires_grad_()
    times = []
    for _ in range(repeats + 1):  # the first fills the dispatch caches
        dist.barrier()
        with context_parallel(mesh_dim="cp", load_balance="striped"), dtp.comm_mode() as comm:
            start = time.perf_counter()
            y = model(x)
            y.sum().backward()
            times.append(time.perf_counter() - start)
    slowest = torch.tensor(min(times[1:]) * 1e3)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return comm, y.placements, float(slowest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    n, say = dist.get_world_size(), print if dist.get_rank() == 0 else (lambda *a, **k: None)
    mesh = dtp.init_device_mesh("cpu", (n,), mesh_dim_names=("cp",))
    B, T, C = args.batch, args.seq, args.channels
    whole = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1))
    ring_fwd = (n - 1) * 2 * B * (T // n) * C * 4
    say(f"striped attention block, nn.Linear q/k/v/o, (B, T, C, heads) = ({B}, {T}, {C}, {args.heads}), fp32, "
        f"{n} ranks (gloo, CPU), fwd + bwd, bytes rank 0 sent")
    say(f"{'way':9} {'all_gathers':>11} {'ring bytes':>11} {'ring formula':>12} {'other bytes':>11} {'ms':>8}  output")
    for way in ("linear", "bmm", "gathered"):
        comm, placements, ms = run(way, whole, mesh, args.heads, args.repeats)
        ring = comm.bytes("ring_shift")
        formula = 3 * ring_fwd if way != "gathered" else 0
        say(f"{way:9} {comm.count('all_gather'):11d} {ring:11d} {formula:12d} {comm.bytes() - ring:11d} {ms:8.1f}  "
            f"{placements[0]}")


if __name__ == "__main__":
    main()
    dist.destroy_process_group()

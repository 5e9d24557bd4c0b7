"""Quickstart: an MLP trained on a 2x2 (dp, tp) mesh, step for step equal to one process.

    torchrun --standalone --nproc-per-node 4 examples/quickstart.py

The batch is sharded over dp; the first weight column-wise and the second row-wise over tp (Megatron
style). The code below the placements is ordinary single-device torch; dtensor_plus inserts the
collectives. Each rank also runs the same steps on whole tensors, and rank 0 prints both loss curves.
"""

import os

import torch

import dtensor_plus as dtp
from dtensor_plus import Replicate, Shard

os.environ.setdefault("OMP_NUM_THREADS", "1")


def train(x, y, w1, w2, steps: int = 5, lr: float = 0.1) -> list[float]:
    """Plain torch: the same function runs on DTensors and on whole tensors."""
    losses = []
    for _ in range(steps):
        loss = ((x @ w1).relu() @ w2 - y).pow(2).mean()
        loss.backward()
        with torch.no_grad():
            for w in (w1, w2):
                w -= lr * w.grad
                w.grad = None
        losses.append(loss.full_tensor().item() if isinstance(loss, dtp.DTensor) else loss.item())
    return losses


def main() -> bool:
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    w1, w2 = torch.randn(16, 32) / 4, torch.randn(32, 4) / 6

    dx = dtp.distribute_tensor(x, mesh, [Shard(0), Replicate()])
    dy = dtp.distribute_tensor(y, mesh, [Shard(0), Replicate()])
    dw1 = dtp.distribute_tensor(w1.clone().requires_grad_(), mesh, [Replicate(), Shard(1)])  # column-wise
    dw2 = dtp.distribute_tensor(w2.clone().requires_grad_(), mesh, [Replicate(), Shard(0)])  # row-wise
    with dtp.comm_mode() as comm:
        spmd = train(dx, dy, dw1, dw2)
    single = train(x, y, w1.clone().requires_grad_(), w2.clone().requires_grad_())

    same = torch.allclose(torch.tensor(spmd), torch.tensor(single), rtol=1e-5, atol=1e-6)
    if mesh.get_rank() == 0:
        print(f"{'step':>4}  {'4 ranks (dp=2, tp=2)':>22}  {'1 process':>12}")
        for step, (a, b) in enumerate(zip(spmd, single)):
            print(f"{step:>4}  {a:>22.8f}  {b:>12.8f}")
        print(f"equal to one process: {same}")
        print(f"collectives on rank 0: {comm}")
    return same


if __name__ == "__main__":
    main()

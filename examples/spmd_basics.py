"""The core API in eight lines, checked against one process.

    torchrun --standalone --nproc-per-node 4 examples/spmd_basics.py

x is batch-sharded over dp, w column-sharded over tp; the loss and w.grad equal the single-process ones.
"""

import torch

import dtensor_plus as dtp


def main() -> None:
    mesh = dtp.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    x_whole, w_whole = torch.randn(8, 16), torch.randn(16, 32, requires_grad=True)

    x = dtp.distribute_tensor(x_whole, mesh, [dtp.Shard(0), dtp.Replicate()])
    w = dtp.distribute_tensor(w_whole, mesh, [dtp.Replicate(), dtp.Shard(1)])
    loss = (x @ w).relu().mean()  # ordinary torch code; collectives are inserted where needed
    loss.backward()  # w.grad is a DTensor equal to the single-device gradient

    single = (x_whole @ w_whole).relu().mean()
    single.backward()
    grad, value = w.grad.full_tensor(), loss.full_tensor()  # collectives: every rank takes part
    if mesh.get_rank() == 0:
        print(f"loss on 4 ranks {value.item():.8f}   on one process {single.item():.8f}")
        print(f"w.grad placements {list(w.grad.placements)}; max |difference| {(grad - w_whole.grad).abs().max():.2e}")
    assert torch.allclose(grad, w_whole.grad, atol=1e-6) and torch.allclose(value, single)


if __name__ == "__main__":
    main()

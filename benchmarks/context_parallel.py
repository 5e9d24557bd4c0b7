"""One attention layer under context parallelism: bytes, activation memory and time per rank, ring and
Ulysses, beside one device and PyTorch's own ``context_parallel`` in the same run.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 4 benchmarks/context_parallel.py
    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 4 benchmarks/context_parallel.py --seq 1024 4096 16384

Causal F.scaled_dot_product_attention forward + backward on (B, H, S, D) q, k, v sharded on S over the "cp"
mesh dim. Per rank it prints:

- bytes sent (``comm_mode``), forward and backward, against the reference figures: ring, (n-1) k/v blocks per
  rank forward, i.e. (n-1) x 2 x B·H·(S/n)·D·4; Ulysses, 4 tensors each moved once, 4 x (n-1)/n x B·H·(S/n)·D·4;
- activation bytes autograd saves for backward (unique storages, via saved_tensors_hooks) against one
  device's figure / n (target: within 1.1x);
- time of forward + backward (median of --repeats, slowest rank), against one device on the whole sequence
  and torch's ``context_parallel`` where it runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dtensor_plus as dtp
from dtensor_plus import Shard
from dtensor_plus.placements import StridedShard
from dtensor_plus.layouts import context_parallel


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs (DTensors: their local blocks)."""
    storages = {}

    def pack(t):
        local = t._local_tensor if isinstance(t, dtp.DTensor) else t
        storage = local.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    slowest = torch.tensor([statistics.median(times)])
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item() * 1e3


def qkv(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(3)]


def one_device(whole):
    q, k, v = (t.clone().requires_grad_() for t in whole)
    memory, out = saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    return memory, lambda: F.scaled_dot_product_attention(*(t.clone().requires_grad_() for t in whole), is_causal=True).sum().backward()


def ours(whole, mesh, kind):
    """kind: "ring", "ring-balanced" (the sequence zigzag-sharded: equal causal work per rank) or "ulysses"."""
    balanced = kind == "ring-balanced"
    placement = StridedShard(2, 1, zigzag=True) if balanced else Shard(2)
    kind = "ring" if balanced else kind
    q, k, v = (dtp.distribute_tensor(t, mesh, [placement], src_data_rank=None).requires_grad_() for t in whole)
    # the output gradient placed like the output: its creation is not part of the layer's traffic
    grad = dtp.distribute_tensor(torch.ones_like(whole[0]), mesh, [placement], src_data_rank=None)

    def step():
        with context_parallel("cp", kind):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(grad)

    with context_parallel("cp", kind):
        memory, out = saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        with dtp.comm_mode() as forward:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with dtp.comm_mode() as backward:
            out.backward(grad)
    return memory, forward.bytes(), backward.bytes(), step


def torch_cp(whole, n):
    """torch's context_parallel on the same shapes (it shards the buffers in place along S)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel as torch_context_parallel

    mesh = init_device_mesh("cpu", (n,), mesh_dim_names=("cp",))
    q, k, v = (t.clone() for t in whole)

    def step():
        with torch_context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            F.scaled_dot_product_attention(qq, kk, vv, is_causal=True).sum().backward()

    step()  # raises here if torch's stack cannot run this on CPU
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    mesh = dtp.init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
    n, rank0 = mesh.size(0), dist.get_rank() == 0
    say = print if rank0 else (lambda *a, **k: None)
    say(f"causal SDPA forward+backward, (B, H, S, D) = ({args.batch}, {args.heads}, S, {args.head_dim}), fp32, "
        f"cp = {n} ranks (gloo, CPU); bytes and memory per rank")
    say(f"{'S':>6} {'kind':13} {'fwd bytes':>10} {'ref':>10} {'ratio':>5} {'bwd bytes':>10} {'act mem':>10} "
        f"{'1dev/n':>10} {'ratio':>5} {'ms':>8} {'1dev ms':>8} {'torch ms':>9}")
    for S in args.seq:
        whole = qkv((args.batch, args.heads, S, args.head_dim), S)
        block = args.batch * args.heads * -(-S // n) * args.head_dim * 4
        single_memory, single_step = one_device(whole)
        single_ms = timed(single_step, 1)
        try:
            torch_ms = f"{timed(torch_cp(whole, n), args.repeats):9.1f}"
        except Exception as err:  # noqa: BLE001 - reported in the table, not hidden
            torch_ms, torch_error = "      n/a", f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        ring = (n - 1) * 2 * block
        for kind, reference in (("ring", ring), ("ring-balanced", ring), ("ulysses", 4 * (n - 1) / n * block)):
            memory, fwd, bwd, step = ours(whole, mesh, kind)
            ms = timed(step, args.repeats)
            say(f"{S:6d} {kind:13} {fwd / 1024:9.0f}K {reference / 1024:9.0f}K {fwd / reference:5.2f} {bwd / 1024:9.0f}K "
                f"{memory / 1024:9.0f}K {single_memory / n / 1024:9.0f}K {memory / (single_memory / n):5.2f} "
                f"{ms:8.1f} {single_ms:8.1f} {torch_ms}")
        if torch_ms.strip() == "n/a":
            say(f"       torch context_parallel: {torch_error}")


if __name__ == "__main__":
    main()
    dist.destroy_process_group()

"""Per-op dispatch overhead on cache hits: dtensor_plus beside torch.distributed.tensor, same ops, same run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dispatch_overhead.py            # 1 rank, in process
    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 benchmarks/dispatch_overhead.py

Tensors are tiny so the time is the framework's, not the kernel's. Prints microseconds per op for plain
torch on the local block, a bare Python __torch_dispatch__ wrapper (the floor for any Python subclass; its
"redistribute" is a clone), torch's DTensor and dtensor_plus, and dtensor_plus / torch.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dtensor_plus as dtp

REPEATS = int(os.environ.get("REPEATS", "2000"))


def _op_sequence(x, w, ln_w, ln_b, redistribute):
    """The measured ops, name -> zero-argument callable, over whatever tensors are given."""
    return {
        "add": lambda: x + x,
        "mul scalar": lambda: x * 0.5,
        "mm": lambda: torch.mm(x, w),
        "view": lambda: x.view(-1),
        "layer_norm": lambda: F.layer_norm(x, (16,), ln_w, ln_b),
        "softmax": lambda: torch.softmax(x, -1),
        "redistribute S(0)->R": redistribute,
    }


def _distributed_ops(distribute_tensor, mesh, shard, replicate):
    x = distribute_tensor(torch.randn(8, 16), mesh, [shard(0)])
    w, ln_w, ln_b = (distribute_tensor(t, mesh, [replicate()]) for t in (torch.randn(16, 16), torch.ones(16), torch.zeros(16)))
    return _op_sequence(x, w, ln_w, ln_b, lambda: x.redistribute(mesh, [replicate()]))


def _local_ops(wrap=lambda t: t):
    x = wrap(torch.randn(8, 16))
    return _op_sequence(x, wrap(torch.randn(16, 16)), wrap(torch.ones(16)), wrap(torch.zeros(16)), x.clone)


class BareWrapper(torch.Tensor):
    """The floor for any Python tensor subclass: a __torch_dispatch__ that unwraps, runs the op, rewraps."""

    @staticmethod
    def __new__(cls, inner):
        r = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype, device=inner.device)
        r.inner = inner
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        out = func(*[a.inner if isinstance(a, BareWrapper) else a for a in args], **(kwargs or {}))
        return BareWrapper(out) if isinstance(out, torch.Tensor) else out


def _time_us(fn) -> float:
    for _ in range(50):  # warm the caches
        fn()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(REPEATS // 5):
            fn()
        samples.append((time.perf_counter() - start) / (REPEATS // 5) * 1e6)
    return statistics.median(samples)


def main() -> None:
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group("gloo")
        else:
            store = dist.FileStore(tempfile.mktemp(), 1)
            dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    torch.manual_seed(0)
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh  # the peer, measured only here

    world = dist.get_world_size()
    ours = _distributed_ops(dtp.distribute_tensor, dtp.init_device_mesh("cpu", (world,)), dtp.Shard, dtp.Replicate)
    theirs = _distributed_ops(distribute_tensor, init_device_mesh("cpu", (world,)), Shard, Replicate)
    local, bare = _local_ops(), _local_ops(BareWrapper)
    rows = [(name, *(_time_us(ops[name]) for ops in (local, bare, theirs, ours))) for name in ours]
    if dist.get_rank() == 0:
        print(f"world size {world}, {REPEATS} calls per op, microseconds per op (median of 5)")
        print(f"{'op':<22}{'local torch':>12}{'bare wrapper':>14}{'torch DTensor':>15}{'dtensor_plus':>14}{'ratio':>8}")
        for name, t_local, t_bare, t_torch, t_ours in rows:
            print(f"{name:<22}{t_local:>12.1f}{t_bare:>14.1f}{t_torch:>15.1f}{t_ours:>14.1f}{t_ours / t_torch:>8.2f}")
        geo = statistics.geometric_mean([row[4] / row[3] for row in rows])
        print(f"{'geometric mean ratio (dtensor_plus / torch DTensor)':<77}{geo:>8.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

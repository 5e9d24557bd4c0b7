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
DEVICE = os.environ.get("DEVICE", "cpu")  # "cuda": the same ops on GPU blocks over NCCL (benchmarks/gpu/run.sh)


def _op_sequence(t: dict, redistribute) -> dict:
    """The measured ops, name -> zero-argument callable, over whatever tensors ``t`` holds: the ops of a
    transformer step, forward, and the main ones with their backward (rows marked "+bwd")."""
    x, w = t["x"], t["w"]
    return {
        "add": lambda: x + x,
        "mul scalar": lambda: x * 0.5,
        "mm": lambda: torch.mm(x, w),
        "linear": lambda: F.linear(x, w, t["b"]),
        "view": lambda: x.view(-1),
        "reshape": lambda: x.reshape(4, 32),
        "transpose": lambda: x.transpose(0, 1),
        "layer_norm": lambda: F.layer_norm(x, (16,), t["ln_w"], t["ln_b"]),
        "rms_norm": lambda: F.rms_norm(x, (16,), t["ln_w"]),
        "softmax": lambda: torch.softmax(x, -1),
        "sdpa": lambda: F.scaled_dot_product_attention(t["q"], t["q"], t["q"], is_causal=True),
        "embedding": lambda: F.embedding(t["idx"], t["emb"]),
        "cross_entropy": lambda: F.cross_entropy(x, t["target"]),
        "redistribute S(0)->R": redistribute,
        "linear +bwd": lambda: F.linear(t["xg"], w).sum().backward(),
        "layer_norm +bwd": lambda: F.layer_norm(t["xg"], (16,), t["ln_w"], t["ln_b"]).sum().backward(),
        "softmax +bwd": lambda: torch.softmax(t["xg"], -1).sum().backward(),
        "sdpa +bwd": lambda: F.scaled_dot_product_attention(t["qg"], t["qg"], t["qg"], is_causal=True).sum().backward(),
        "cross_entropy +bwd": lambda: F.cross_entropy(t["xg"], t["target"]).backward(),
    }


def _tensors() -> dict:
    """Tiny tensors (the time is the framework's): x (8, 16) rows, q (B=2, H=2, S=4, D=8), int indices."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=gen)
    tensors = {
        "x": x, "xg": x.clone().requires_grad_(), "w": torch.randn(16, 16, generator=gen), "b": torch.zeros(16),
        "ln_w": torch.ones(16), "ln_b": torch.zeros(16), "q": torch.randn(2, 2, 4, 8, generator=gen),
        "idx": torch.randint(0, 32, (8, 4), generator=gen), "emb": torch.randn(32, 16, generator=gen),
        "target": torch.randint(0, 16, (8,), generator=gen),
    }
    return {name: t.to(DEVICE) for name, t in tensors.items()}


_SHARDED = {"x": 0, "xg": 0, "q": 0, "idx": 0, "target": 0}  # batch-sharded (dim 0); the rest replicated


def _distributed_ops(distribute_tensor, mesh, shard, replicate):
    t = {name: distribute_tensor(v.detach(), mesh, [shard(_SHARDED[name]) if name in _SHARDED else replicate()])
         for name, v in _tensors().items()}
    t["xg"].requires_grad_()
    t["qg"] = t["q"].detach().requires_grad_()
    return _op_sequence(t, lambda: t["x"].redistribute(mesh, [replicate()]))


def _local_ops(wrap=lambda t: t):
    tensors = _tensors()
    tensors["qg"] = tensors["q"].detach().requires_grad_()
    t = {name: wrap(v) for name, v in tensors.items()}
    return _op_sequence(t, t["x"].clone)


class BareWrapper(torch.Tensor):
    """The floor for any Python tensor subclass: a __torch_dispatch__ that unwraps, runs the op, rewraps every
    tensor output (native_layer_norm, sdpa and nll_loss return several), and takes part in autograd (so the
    "+bwd" rows have a floor too: autograd's backward ops dispatch through it like any other op)."""

    @staticmethod
    def __new__(cls, inner, requires_grad=False):
        r = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype,
                                                device=inner.device, requires_grad=requires_grad)
        r.inner = inner
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        out = func(*[a.inner if isinstance(a, BareWrapper) else a for a in args], **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            return BareWrapper(out)
        if isinstance(out, (tuple, list)):
            return type(out)(BareWrapper(o) if isinstance(o, torch.Tensor) else o for o in out)
        return out


def _bare(t: torch.Tensor) -> BareWrapper:
    return BareWrapper(t.detach(), requires_grad=t.requires_grad)


def _time_us(fn) -> float:
    """Median microseconds per call; nan where the op raises (e.g. torch DTensor has no rule for it)."""
    try:
        for _ in range(50):  # warm the caches
            fn()
    except Exception:  # noqa: BLE001 - reported as n/a in the table
        return float("nan")
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(REPEATS // 5):
            fn()
        samples.append((time.perf_counter() - start) / (REPEATS // 5) * 1e6)
    return statistics.median(samples)


def main() -> None:
    backend = "nccl" if DEVICE == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            store = dist.FileStore(tempfile.mktemp(), 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
    if DEVICE == "cuda":
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    torch.manual_seed(0)
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh  # the peer, measured only here

    world = dist.get_world_size()
    ours = _distributed_ops(dtp.distribute_tensor, dtp.init_device_mesh(DEVICE, (world,)), dtp.Shard, dtp.Replicate)
    theirs = _distributed_ops(distribute_tensor, init_device_mesh(DEVICE, (world,)), Shard, Replicate)
    local, bare = _local_ops(), _local_ops(_bare)
    rows = [(name, *(_time_us(ops[name]) for ops in (local, bare, theirs, ours))) for name in ours]
    if dist.get_rank() == 0:
        print(f"{DEVICE}, world size {world}, {REPEATS} calls per op, microseconds per op (median of 5); n/a: the op fails there")
        print(f"{'op':<22}{'local torch':>12}{'bare wrapper':>14}{'torch DTensor':>15}{'dtensor_plus':>14}{'ratio':>8}")
        for name, t_local, t_bare, t_torch, t_ours in rows:
            ratio = t_ours / t_torch if t_torch == t_torch else float("nan")
            print(f"{name:<22}{t_local:>12.1f}{t_bare:>14.1f}{t_torch:>15.1f}{t_ours:>14.1f}{ratio:>8.2f}".replace("nan", "n/a"))
        ratios = [row[4] / row[3] for row in rows if row[3] == row[3]]
        print(f"{'geometric mean ratio (dtensor_plus / torch DTensor), ops both run':<77}{statistics.geometric_mean(ratios):>8.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

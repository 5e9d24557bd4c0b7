"""Checkpoint save and load throughput: dtensor_plus.checkpoint beside torch.distributed.checkpoint (DCP), same
state, same layout, same run.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 4 benchmarks/checkpoint.py --mb 256

The state is a model-like dict of fp32 weights and their two AdamW moments (``--mb`` MiB in all), ZeRO-3
style: every tensor Shard(0) on a 1-d dp mesh of all ranks (uneven rows included). The same local blocks are
wrapped as torch.distributed.tensor DTensors for DCP. Rows (median of ``--repeats``, ours and DCP's run alternately; the slowest rank's time):
save; load into the same layout; load resharded into Shard(1) (the mesh splits the other dim: every rank reads
a slice of every file). MB/s per rank = (state MiB / ranks) / time. ``verify`` is our crc32 check on load.
The directory is ``--dir`` (default: a temporary directory on local disk; the page cache is warm after save,
as right after a save in training).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh as torch_mesh
from torch.distributed.tensor import DTensor as TorchDTensor, Shard as TorchShard

import dtensor_plus as dtp
from dtensor_plus import checkpoint


def _shapes(total_mb: int) -> list[tuple[int, int]]:
    """Weights of a small GPT-like model whose params + 2 moments are ``total_mb`` MiB (fp32)."""
    width = 1024
    rows = max(1, total_mb * 2**20 // (3 * 4 * width * 8))
    return [(rows + 3, width)] * 4 + [(rows * 2 + 1, width)] * 2  # 8 units of rows: 4 x 1 + 2 x 2


def _states(args, mesh, tmesh):
    ours, theirs = {}, {}
    g = torch.Generator().manual_seed(0)
    for i, shape in enumerate(_shapes(args.mb)):
        for kind in ("weight", "exp_avg", "exp_avg_sq"):
            whole = torch.randn(shape, generator=g)
            dt = dtp.distribute_tensor(whole, mesh, [dtp.Shard(0)], src_data_rank=None)
            ours[f"layer{i}.{kind}"] = dt
            theirs[f"layer{i}.{kind}"] = TorchDTensor.from_local(dt._local_tensor.clone(), tmesh, [TorchShard(0)],
                                                                 shape=whole.shape, stride=whole.stride(), run_check=False)
    return ours, theirs


def _resharded(state, mesh, tmesh, ours: bool):
    out = {}
    for key, t in state.items():
        whole = torch.zeros(t.shape)
        if ours:
            out[key] = dtp.distribute_tensor(whole, mesh, [dtp.Shard(1)], src_data_rank=None)
        else:
            local = whole.chunk(dist.get_world_size(), 1)[dist.get_rank()].contiguous()
            out[key] = TorchDTensor.from_local(local, tmesh, [TorchShard(1)], shape=whole.shape, stride=whole.stride())
    return out


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    mesh = dtp.init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),), mesh_dim_names=("dp",))
    tmesh = torch_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    ours, theirs = _states(args, mesh, tmesh)
    total_mb = sum(t.numel() * t.element_size() for t in ours.values()) / 2**20
    root = args.dir or (tempfile.mkdtemp(prefix="dtp_ckpt_bench_") if dist.get_rank() == 0 else None)
    root_list = [root]
    dist.broadcast_object_list(root_list, src=0)  # the benchmark, not the library, may pickle
    root = root_list[0]
    ours_path, dcp_path = os.path.join(root, "ours"), os.path.join(root, "dcp")
    rows = {
        "save": (lambda: checkpoint.save(ours, ours_path), lambda: dcp.save(theirs, checkpoint_id=dcp_path)),
        "save async (until returned)": (lambda: _async(ours, ours_path), lambda: _dcp_async(theirs, dcp_path)),
        "load same layout (verify)": (lambda: checkpoint.load(ours, ours_path), lambda: dcp.load(theirs, checkpoint_id=dcp_path)),
        "load same layout (no verify)": (lambda: checkpoint.load(ours, ours_path, verify=False), None),
        "load into Shard(1) (verify)": (lambda: checkpoint.load(_resharded(ours, mesh, tmesh, True), ours_path),
                                       lambda: dcp.load(_resharded(theirs, mesh, tmesh, False), checkpoint_id=dcp_path)),
        "load into Shard(1) (no verify)": (
            lambda: checkpoint.load(_resharded(ours, mesh, tmesh, True), ours_path, verify=False), None),
    }
    results = {}
    for name, (mine, torch_fn) in rows.items():
        results[name] = _medians(mine, torch_fn, args.repeats)
    _check_equal(ours, mesh, ours_path)
    if dist.get_rank() == 0:
        per_rank = total_mb / dist.get_world_size()
        print(f"# checkpoint: {total_mb:.0f} MiB fp32 state, Shard(0) on dp={dist.get_world_size()}, {root}")
        print(f"| {'operation':32s} | ours s | ours MB/s/rank | DCP s | DCP MB/s/rank | ours/DCP time |")
        print("|---|---|---|---|---|---|")
        for name, (a, b) in results.items():
            theirs_cols = f"{b:.3f} | {per_rank / b:.0f} | {a / b:.2f}x" if b else "- | - | -"
            print(f"| {name:32s} | {a:.3f} | {per_rank / a:.0f} | {theirs_cols} |")
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


_PENDING, _GROUP = [], []


def _async(state, path):
    _PENDING.append(checkpoint.save(state, path, async_save=True))


def _dcp_async(state, path):
    # DCP's background thread runs its own collectives: on a group of its own, as torch's docs ask
    if not _GROUP:
        _GROUP.append(dist.new_group(backend="gloo"))
    _PENDING.append(dcp.async_save(state, checkpoint_id=path, process_group=_GROUP[0]))


def _finish_async():
    for p in _PENDING:
        p.wait() if hasattr(p, "wait") else p.result()
    _PENDING.clear()


def _medians(mine, theirs, repeats: int) -> list:
    """Median times of ours and DCP's, run alternately so that a busy moment of the machine hits both alike."""
    times = [[], []]
    for _ in range(repeats):
        for i, fn in enumerate((mine, theirs)):
            if fn is not None:
                times[i].append(_timed(fn))
                _finish_async()
    return [statistics.median(t) if t else None for t in times]


def _check_equal(ours, mesh, path):
    fresh = {k: dtp.distribute_tensor(torch.zeros(t.shape), mesh, [dtp.Replicate()], src_data_rank=None) for k, t in ours.items()}
    checkpoint.load(fresh, path)
    for key, t in ours.items():
        assert torch.equal(fresh[key].to_local(), t.full_tensor()), key


if __name__ == "__main__":
    main()

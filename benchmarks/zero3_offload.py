"""ZeRO-3 offload (layouts/offload.py, ``CPUOffload``): the bytes copied between host and device per step and how
much of the host optimizer step the overlapped step hides, against the step after backward, beside the papers.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 benchmarks/zero3_offload.py --config small

Variants (each a fresh GPT, same seed and batches; AdamW, foreach=False):
  no offload, step after      fully_shard, opt.step() after backward (the step on the shards' local blocks);
  offload, step after         CPUOffload(): the same step, on the host copies;
  offload, overlapped step    CPUOffload() + OverlappedStep: each unit's step on a side thread as its gradients
                              land, the unit's next gather waiting for it;
  offload+act, overlapped     and offload_activations=True.
Columns: the step time (median of the slowest rank); "host step ms": the optimizer's own time per step, mean
(the step after backward: all of it on the critical path; overlapped: summed over the units' side-thread steps);
"waited ms": how long the main thread was blocked on it, mean per step ("wait host step" in the units'
timeline; the whole step when it runs after backward); hidden = 1 - waited / host step. Bytes per rank per
step, as the units count them: shards to the device (forward gathers and backward re-gathers), gradient shards
to the host, activations to the host and back. On a CPU mesh the host is the device: no copy runs and the
bytes are what an accelerator would move; the side thread competes with the main thread for the same cores (2
shared cores here), so the hidden fraction is a lower bound of what an accelerator's host step would hide.

The papers: ZeRO-Offload (Ren et al. 2021) moves 4M bytes per step for M parameters (fp16 gradients to the host,
fp16 parameters back; its parameters stay on the GPU, ZeRO-2 style), and hides the CPU step by its one-step
delayed parameter update (stale parameters; exact here, by waiting per unit instead). ZeRO-Infinity (Rajbhandari
et al. 2021) offloads parameters too, to host or NVMe, gathered per layer with prefetch: per rank and step, in the
parameters' dtype, 1x the shard to the device for forward, 1x again for the re-gather in backward and 1x the
gradient shard back, which is the formula printed beside ours (fp32 here).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import dtensor_plus as dtp  # noqa: E402
from dtensor_plus.layouts import fully_shard  # noqa: E402
from dtensor_plus.layouts.data import shard_batch  # noqa: E402
from dtensor_plus.layouts.offload import OverlappedStep  # noqa: E402
from dtensor_plus.layouts.zero import CPUOffload  # noqa: E402
from gpt import GPT, PRESETS  # noqa: E402

ADAMW = dict(lr=1e-3, weight_decay=0.1, foreach=False)
VARIANTS = {
    "no offload, step after": dict(offload=None, overlapped=False, activations=False),
    "offload, step after": dict(offload=CPUOffload(pin_memory=False), overlapped=False, activations=False),
    "offload, overlapped step": dict(offload=CPUOffload(pin_memory=False), overlapped=True, activations=False),
    "offload+act, overlapped": dict(offload=CPUOffload(pin_memory=False), overlapped=True, activations=True),
}


def place(config, offload, overlapped, activations):
    torch.manual_seed(0)
    model = GPT(config)
    mesh = dtp.init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    dtp.distribute_module(model, mesh)  # the causal masks too: fully_shard places only parameters
    for block in model.blocks:
        fully_shard(block, mesh, offload=offload, offload_activations=activations)
    fully_shard(model, mesh, offload=offload, offload_activations=activations)
    if overlapped:
        return model, OverlappedStep(model, torch.optim.AdamW, **ADAMW), mesh
    return model, torch.optim.AdamW(model.parameters(), **ADAMW), mesh


def run(config, variant, batches, warmup):
    """Step times, then the host step's and the wait's mean time per measured step, then the bytes of one step."""
    model, opt, mesh = place(config, **variant)
    units = [m._zero_state for m in model.modules() if hasattr(m, "_zero_state")]
    schedule = units[0].schedule
    times, host, waited = [], [], []
    for i, (tokens, targets) in enumerate(batches):
        dist.barrier()
        if i == warmup:
            schedule.timeline = []  # the overlapped steps, recorded from here to the end (they span step bounds)
        for unit in units:
            unit.offload_bytes.clear()
        start = time.perf_counter()
        x, y = shard_batch(tokens, mesh), shard_batch(targets, mesh)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(0, 1))
        loss.backward()
        if not isinstance(opt, OverlappedStep):
            step_start = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                host.append(time.perf_counter() - step_start)
                waited.append(host[-1])  # on the critical path, all of it
        if i >= warmup:
            times.append(time.perf_counter() - start)
    moved = sum((unit.offload_bytes for unit in units), start=collections.Counter())
    if isinstance(opt, OverlappedStep):
        opt.close()  # waits for the last steps (recorded), as the next forward would
        steps = len(batches) - warmup
        host = [sum(b - a for what, _, a, b in schedule.timeline if what == "host step") / steps]
        waited = [sum(b - a for what, _, a, b in schedule.timeline if what == "wait host step") / steps]
    return times, statistics.mean(host), statistics.mean(waited), dict(moved)


def slowest_median(values) -> float:
    t = torch.tensor([statistics.median(values) if values else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="debug", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    config = PRESETS[args.config]
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.warmup + args.steps):
        x = torch.randint(0, config.vocab_size, (args.batch_size, config.block_size), generator=g)
        batches.append((x, torch.roll(x, -1, 1)))
    rows = []
    for name, variant in VARIANTS.items():
        times, host, waited, moved = run(config, variant, batches, args.warmup)
        rows.append((name, slowest_median(times), slowest_median([host]), slowest_median([waited]), moved))
    model = GPT(config)
    params = sum(p.numel() for p in model.parameters())
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}  # weight and bias saved
    saved = sum(p.numel() for n, p in model.named_parameters()
                if (n.endswith("weight") and "emb" not in n) or n.rsplit(".", 1)[0] in norms)
    if rank == 0:
        base = rows[0][1]
        print(f"GPT {args.config} ({params} parameters, fp32), batch {args.batch_size}, {world} ranks (gloo, CPU)")
        print(f"{'variant':<26}{'step ms':>9}{'/no offl.':>10}{'host step ms':>13}{'waited ms':>10}{'hidden':>8}"
              f"{'to device B':>13}{'to host B':>11}{'act. B':>10}")
        for name, t, h, w, moved in rows:
            hidden = f"{1 - w / h:.2f}" if h else "-"
            print(f"{name:<26}{t * 1e3:>9.1f}{t / base:>10.2f}{h * 1e3:>13.1f}{w * 1e3:>10.1f}{hidden:>8}"
                  f"{moved.get('to device', 0):>13}{moved.get('to host', 0):>11}"
                  f"{moved.get('activations to host', 0):>10}")
        print(f"ZeRO-Infinity's formula per rank (fp32, unpadded ~ params / {world}): to device "
              f"{4 * (params + saved) // world} B (forward + re-gathered weights), to host {4 * params // world} B; "
              f"ZeRO-Offload's 4M (fp16, unpartitioned): {4 * params} B")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

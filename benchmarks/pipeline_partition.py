"""Balanced pipeline stages against the even split, on a GPT whose head dwarfs a block (vocab >> dim).

    .venv/bin/python benchmarks/pipeline_partition.py --simulate              # one process, simulated costs
    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 4 benchmarks/pipeline_partition.py

The plans (``partition_layers`` over examples/balanced_pipeline_gpt.py's layers: embedding, blocks, head+loss):
  * even: pipeline_gpt.split_gpt's cut (the blocks spread evenly, the embedding and the head on the end stages);
  * balanced: the cut with the shortest simulated 1F1B step, no memory cap;
  * capped: the same under a cap of ``--cap-fraction`` x the even split's peak memory, recomputation allowed
    (AdaPipe's joint choice; BPipe's imbalance: 1F1B's first stage keeps p microbatches, the last one).
With ``--simulate`` the costs are FLOPs and bytes of a simulated world (``--preset big``: a GPT-2-sized body with
GPT-2's 50257-token vocabulary, which no CPU here could run) and the figures are the schedule simulator's. Under
torchrun, rank 0 plans from the FLOPs ("balanced (FLOPs)") and from each layer timed on this machine (thread CPU
time: "balanced (timed)", "capped (timed)"; the predicted ratios are against the even split under the same
costs), and every plan trains ``--steps`` steps (after ``--warmup``) round-robin, step i of each before step i+1
of any, so the machine's load falls on all alike. Printed per plan: the cut and policies; step ms (median,
slowest rank); the step simulated from each action's thread CPU time (``cpu ms``: robust to a loaded machine);
the measured bubble (1 - compute / (ranks x step)); per-rank memory in KiB, the model's (state + in-flight x kept
+ recomputed) and the measured one (state after the optimizer step + peak saved tensors; torch's checkpoint keeps the tensors it
recomputes outside the saved-tensor hooks, so a recomputing stage's measured figure lacks them).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from balanced_pipeline_gpt import even_gpt_boundaries, gpt_cost_model, split_gpt_at  # noqa: E402
from dtensor_plus.layouts.pipeline.layer_costs import measured_layer_costs, simulated_layer_costs  # noqa: E402
from dtensor_plus.layouts.pipeline.partition import evaluate_partition, partition_layers  # noqa: E402
from dtensor_plus.simulate.memory import SavedTensorTracker, state_memory, storage_key  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402
from pipeline_gpt import gpt_loss  # noqa: E402

PRESETS = {
    "small": GPTConfig(vocab_size=4096, block_size=32, num_layers=12, num_heads=2, dim=64),
    "big": GPTConfig(vocab_size=50257, block_size=1024, num_layers=12, num_heads=12, dim=768),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--simulate", action="store_true", help="one process: simulated costs and figures only")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--stages", type=int, default=4, help="with --simulate (torchrun: the world size)")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--cap-fraction", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    return parser.parse_args()


def plans(costs, config, p, m, cap_fraction):
    """{name: Partition}: even, balanced, capped."""
    even = evaluate_partition(costs, even_gpt_boundaries(config.num_layers, p), m)
    balanced = partition_layers(costs, p, m)
    capped = partition_layers(costs, p, m, memory_cap=int(cap_fraction * even.peak_memory))
    return {"even": even, "balanced": balanced, f"capped {cap_fraction:g}": capped}


def describe(name, plan, even) -> str:
    kib = " ".join(f"{b / 1024:.0f}" for b in plan.memory)
    return (f"{name:>14}: cuts {plan.boundaries} policies {'/'.join(plan.policies)}\n{'':16}"
            f"step {plan.step_time / even.step_time:.3f} x even, bubble {plan.bubble:.3f}, memory KiB per stage "
            f"[{kib}], peak {plan.peak_memory / even.peak_memory:.3f} x even")


def simulated_report(args):
    config = PRESETS[args.preset].replace(dropout=0.0)
    start = time.perf_counter()
    costs = simulated_layer_costs(gpt_cost_model(config, args.micro_batch_size))
    print(f"{args.preset}: {config}\nmicro batch {args.micro_batch_size}, {args.microbatches} microbatches, "
          f"{args.stages} stages, 1F1B; layer costs simulated in {time.perf_counter() - start:.1f} s")
    block, head = costs[1], costs[-1]
    print(f"head+loss / block: forward FLOPs {head.forward / block.forward:.2f}, "
          f"state {head.state_bytes / block.state_bytes:.2f}")
    found = plans(costs, config, args.stages, args.microbatches, args.cap_fraction)
    for name, plan in found.items():
        print(describe(name, plan, found["even"]))


# -- measured on ranks --------------------------------------------------------------------------------------------


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class Run:
    """One plan's pipeline on this rank: its step, times, timelines, memory."""

    def __init__(self, plan, config, mesh, batch, microbatches):
        from dtensor_plus.layouts.pipeline import PipelineSchedule, PipelineStage

        rank, p = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(0)
        self.piece = split_gpt_at(GPT(config), plan.boundaries, plan.policies)[rank]
        self.opt = torch.optim.AdamW(self.piece.parameters(), lr=1e-3, foreach=False)
        self.pipe = PipelineSchedule(PipelineStage(self.piece, rank, p, mesh), "1f1b", microbatches, gpt_loss)
        self.batch, self.times, self.timelines, self.memory = batch, [], [], (0, 0)

    def step(self):
        tracker = SavedTensorTracker(skip_keys={storage_key(q) for q in self.piece.parameters()})
        dist.barrier()
        start = time.perf_counter()
        with tracker.hooks():
            self.pipe.step(self.batch[0], target=self.batch[1])
        self.opt.step()
        self.times.append(_slowest(time.perf_counter() - start))
        self.timelines.append(list(self.pipe.timeline))
        state = sum(state_memory([self.piece], [self.opt]).values())
        self.opt.zero_grad(set_to_none=True)
        self.memory = (state, tracker.peak_bytes)


def measured_report(args):
    import dtensor_plus as dtp
    from dtensor_plus.layouts.pipeline import build_schedule
    from dtensor_plus.layouts.pipeline.simulate import simulate, stage_costs_from_events

    config = PRESETS[args.preset].replace(dropout=0.0)
    p, m = int(os.environ["WORLD_SIZE"]), args.microbatches
    found = [None]
    # rank 0 plans before joining the group (a simulated world runs its own fake one); the others wait in the
    # rendezvous, so the layer timings see a machine without their work
    if int(os.environ["RANK"]) == 0:
        build = gpt_cost_model(config, args.micro_batch_size)
        flops = plans(simulated_layer_costs(build), config, p, m, args.cap_fraction)
        timed_costs = measured_layer_costs(build, repeats=5)
        block, head = timed_costs[1], timed_costs[-1]
        ratio = (head.forward + head.backward) / (block.forward + block.backward)
        print(f"timed on this machine: head+loss / block F+BW {ratio:.2f}, a block's full recomputation / its "
              f"forward {block.recompute['full'] / block.forward:.2f}", flush=True)
        timed = plans(timed_costs, config, p, m, args.cap_fraction)
        found[0] = {"even": (flops["even"], flops["even"]), "balanced (FLOPs)": (flops["balanced"], flops["even"])}
        found[0].update({f"{name} (timed)": (plan, timed["even"]) for name, plan in timed.items() if name != "even"})
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    rank = dist.get_rank()
    dist.broadcast_object_list(found, src=0)
    found = found[0]
    mesh = dtp.init_device_mesh("cpu", (p,), mesh_dim_names=("pp",))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (m * args.micro_batch_size, config.block_size + 1), generator=g)
    runs = {name: Run(plan, config, mesh, (tokens[:, :-1], tokens[:, 1:]), m) for name, (plan, _) in found.items()}
    for _ in range(args.warmup + args.steps):
        for run in runs.values():
            run.step()
    even_ms, schedule = None, build_schedule("1f1b", p, m)
    for name, run in runs.items():
        kept = list(range(args.warmup, args.warmup + args.steps))
        median = sorted(kept, key=lambda i: run.times[i])[len(kept) // 2]
        timelines = [None] * p
        dist.all_gather_object(timelines, run.timelines[median])
        memories = [None] * p
        dist.all_gather_object(memories, run.memory)
        if rank != 0:
            continue
        events = [e for tl in timelines for e in tl]
        span = max(e.end for e in events) - min(e.start for e in events)
        busy = sum(e.end - e.start for e in events if e.action.kind.is_compute)
        cpu = [dataclasses.replace(e, end=e.start + e.cpu) for e in events if e.cpu is not None]
        cpu_ms = simulate(schedule, stage_costs_from_events(cpu)).step_time * 1e3
        ms = statistics.median(run.times[w] for w in kept) * 1e3
        even_ms = even_ms or (ms, cpu_ms)
        plan, even = found[name]
        print(describe(name, plan, even))
        print(f"{'':16}measured: step {ms:.1f} ms ({ms / even_ms[0]:.3f} x even), cpu {cpu_ms:.1f} ms "
              f"({cpu_ms / even_ms[1]:.3f} x even), bubble {1 - busy / (p * span):.3f}; memory KiB per rank "
              f"[{' '.join(f'{(s + a) / 1024:.0f}' for s, a in memories)}] (state + saved tensors)")
    dist.destroy_process_group()


def main():
    args = parse_args()
    torch.set_num_threads(1)
    if args.simulate:
        simulated_report(args)
    else:
        measured_report(args)


if __name__ == "__main__":
    main()

"""Data parallelism's training step beside DDP's, phase by phase, with the communication each rank waits on.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 benchmarks/dp_overlap.py --config debug \
        --json /tmp/dp_after_2.json [--figure benchmarks/figures/dp_timeline.svg --before /tmp/dp_before_2.json]

``replicate(model, mesh)`` (local compute, buckets all-reduced asynchronously as they fill) and
``DistributedDataParallel`` train the GPT of benchmarks/train_step.py (AdamW, foreach=False) on the same batches;
their steps alternate (ours, DDP, DDP, ours, ...), so the machine's noise falls on both alike. Each rank keeps a
timeline of every step (``time.perf_counter``):

    forward            model(x)
    loss               cross_entropy on the outputs (ours: on DTensors, its total weight all-reduced)
    backward compute   loss.backward() until the last parameter gradient is accumulated (the last bucket hook
                       for ours, a post-accumulate-grad hook on every parameter for DDP)
    backward tail      from then until backward returns: the last buckets start, every bucket is waited on,
                       the gradients written (DDP's reducer finalizes here)
    step               the optimizer step

and the waits on communication (exposed communication: the time a rank is blocked on a collective): ours, each
bucket's ``wait()`` (dtensor_plus.buckets._Pending) and each synchronous collective (the loss's all-reduce:
``dtensor_plus.collectives._run`` without ``async_op``); DDP, its backward tail (the reducer waits on its
buckets there; its finalize's own copies are counted in, an upper bound). The table gives medians over the timed
steps of the slowest rank. ``--figure`` draws one step per rank (the median one of ours), ours above DDP's,
and with ``--before`` (this script's ``--json`` from an earlier commit, e.g. a worktree put first on
PYTHONPATH) that run's step as well.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from dtensor_plus import buckets, collectives  # noqa: E402
from dtensor_plus.layouts import data  # noqa: E402
from gpt import GPT, PRESETS  # noqa: E402
from layout_setups import place_ours, place_torch  # noqa: E402

PHASES = ("forward", "loss", "backward compute", "backward tail", "step")


class Recorder:
    """Collects, for the step in progress, the phase boundaries and the intervals spent waiting."""

    def __init__(self):
        self.waits: list | None = None  # (start, end, what) of the step in progress; None outside ours' steps
        self.last_grad = 0.0

    def wait(self, start, end, what):
        if self.waits is not None:
            self.waits.append((start, end, what))


REC = Recorder()


def _instrument() -> None:
    """Time ours' waits where both the new and the earlier code pass: bucket waits, synchronous collectives,
    gradient hooks. Done before placing the model (the hooks bind methods then)."""
    pending_wait, run = buckets._Pending.wait, collectives._run

    def timed_wait(self):
        start = time.perf_counter()
        try:
            return pending_wait(self)
        finally:
            REC.wait(start, time.perf_counter(), "bucket all-reduce")

    def timed_run(name, mesh, mesh_dim, fn, *args, **kwargs):
        if kwargs.get("async_op"):
            return run(name, mesh, mesh_dim, fn, *args, **kwargs)
        start = time.perf_counter()
        try:
            return run(name, mesh, mesh_dim, fn, *args, **kwargs)
        finally:
            REC.wait(start, time.perf_counter(), f"sync {name}")

    buckets._Pending.wait, collectives._run = timed_wait, timed_run
    for method in ("add", "add_local"):  # add_local: the local leaves' hook (absent before)
        original = getattr(data.GradientBucket, method, None)
        if original is not None:
            setattr(data.GradientBucket, method, _after(original))


def _after(method):
    def hooked(*args, **kwargs):
        out = method(*args, **kwargs)
        REC.last_grad = time.perf_counter()
        return out

    return hooked


def _mark_grad(_param) -> None:
    REC.last_grad = time.perf_counter()


def one_step(placed, tokens, targets, ddp: bool) -> dict:
    REC.waits = []
    t0 = time.perf_counter()
    x, y = placed.inputs(tokens, targets)
    out = placed.model(x)
    t1 = time.perf_counter()
    loss = F.cross_entropy(out.flatten(0, 1), y.flatten(0, 1))
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    placed.opt.step()
    t4 = time.perf_counter()
    placed.opt.zero_grad(set_to_none=True)
    t5 = time.perf_counter()
    waits = [(a - t0, b - t0, what) for a, b, what in REC.waits]
    last = min(max(REC.last_grad, t2), t3)
    if ddp:  # the reducer's waits are not visible from Python: its whole tail is counted as waiting
        waits = [(last - t0, t3 - t0, "DDP backward tail")]
    REC.waits = None
    bounds = [t0, t1, t2, last, t3, t4]
    return {"phases": {name: (a - t0, b - t0) for name, a, b in zip(PHASES, bounds, bounds[1:])},
            "waits": waits, "total": t5 - t0}


def _summary(steps) -> dict:
    out = {name: statistics.median(s["phases"][name][1] - s["phases"][name][0] for s in steps) for name in PHASES}
    out["exposed"] = statistics.median(sum(b - a for a, b, _ in s["waits"]) for s in steps)
    out["total"] = statistics.median(s["total"] for s in steps)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="debug", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each (medians)")
    parser.add_argument("--json", help="write every rank's timelines and the summary here (rank 0)")
    parser.add_argument("--figure", help="draw a timeline picture here (.svg or .png; needs matplotlib)")
    parser.add_argument("--before", help="--json of an earlier run to draw above (the 'before' timeline)")
    args = parser.parse_args(argv)
    _instrument()
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    config = PRESETS[args.config]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (args.batch_size, config.block_size), generator=g)
               for _ in range(args.warmup + args.steps)]
    batches = [(x, torch.roll(x, -1, 1)) for x in batches]
    torch.manual_seed(0)
    ours = place_ours("dp", GPT(config), world)
    torch.manual_seed(0)
    theirs = place_torch("dp", GPT(config), world)
    for p in theirs.model.parameters():
        p.register_post_accumulate_grad_hook(_mark_grad)
    timelines = {"ours": [], "ddp": []}
    for i, (tokens, targets) in enumerate(batches):
        order = (("ours", ours), ("ddp", theirs)) if i % 2 == 0 else (("ddp", theirs), ("ours", ours))
        for name, placed in order:
            dist.barrier()
            step = one_step(placed, tokens, targets, ddp=name == "ddp")
            if i >= args.warmup:
                timelines[name].append(step)
    gathered = [None] * world
    dist.all_gather_object(gathered, timelines)
    if rank == 0:
        per_rank = [{name: _summary(steps) for name, steps in t.items()} for t in gathered]
        slowest = {name: max(per_rank, key=lambda r: r[name]["total"])[name] for name in ("ours", "ddp")}
        print(f"GPT {args.config}, batch {args.batch_size}, {world} ranks (gloo, CPU), AdamW; medians of "
              f"{args.steps} steps, slowest rank, ms")
        print(f"{'':10}" + "".join(f"{p:>18}" for p in (*PHASES, "exposed comm", "step total")))
        for name in ("ours", "ddp"):
            s = slowest[name]
            print(f"{name:10}" + "".join(f"{s[p] * 1e3:18.2f}" for p in (*PHASES, "exposed", "total")))
        print(f"ours / DDP step time: {slowest['ours']['total'] / slowest['ddp']['total']:.2f}")
        result = {"config": args.config, "world": world, "summary": slowest, "timelines": gathered}
        if args.json:
            Path(args.json).write_text(json.dumps(result))
        if args.figure:
            before = json.loads(Path(args.before).read_text()) if args.before else None
            draw(result, before, args.figure)
    dist.destroy_process_group()


COLORS = {"forward": "#4c78a8", "loss": "#72b7b2", "backward compute": "#f58518", "backward tail": "#bab0ac",
          "step": "#54a24b"}


def _median_step(steps):
    totals = sorted(range(len(steps)), key=lambda i: steps[i]["total"])
    return totals[len(totals) // 2]


def draw(result, before, path) -> None:
    """One step per rank and run: phases as bars, waits on communication as red bars over them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []  # (label, step)
    runs = ([("before", before)] if before else []) + [("after", result)]
    for run_name, run in runs:
        for name in ("ours", "ddp"):
            index = _median_step(run["timelines"][0][name])
            for rank, timeline in enumerate(run["timelines"]):
                label = f"{'DDP' if name == 'ddp' else 'ours'} ({run_name} run) rank {rank}"
                rows.append((label, timeline[name][index]))
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.2))
    for y, (label, step) in enumerate(reversed(rows)):
        for phase, (a, b) in step["phases"].items():
            ax.barh(y, (b - a) * 1e3, left=a * 1e3, height=0.6, color=COLORS[phase])
        for a, b, _ in step["waits"]:
            ax.barh(y, (b - a) * 1e3, left=a * 1e3, height=0.25, color="#e45756")
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)])
    ax.set_xlabel("ms from the start of the step (the median step of rank 0)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    handles.append(plt.Rectangle((0, 0), 1, 1, color="#e45756"))
    ax.legend(handles, [*COLORS, "waiting on communication"], loc="lower right", fontsize=7)
    ax.set_title(f"GPT {result['config']}, {result['world']} ranks: one training step per rank, ours (replicate) "
                 f"and DDP", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()

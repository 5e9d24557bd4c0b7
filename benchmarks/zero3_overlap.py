"""ZeRO-3 (``fully_shard``) step time and exposed communication, with and without overlap and local compute,
beside FSDP2 (torch.distributed.fsdp.fully_shard) on the same GPT and mesh; draws one step's per-rank timeline.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 benchmarks/zero3_overlap.py --config debug

Variants of ours (each a fresh GPT, same seed and batches):
  dtensor no-overlap   local_compute=False, overlap=False: every op dispatched as DTensor, every collective
                        waited for where it is issued;
  dtensor overlap       local_compute=False, overlap=True;
  local no-overlap      local_compute=True,  overlap=False;
  local overlap         local_compute=True,  overlap=True (the default).
Exposed communication is read from the units' timeline (layouts/zero_schedule.py): the time this rank was
blocked in a collective's wait (an all-gather not prefetched is issued and waited for at once: all exposed),
summed over one step; the median step over ranks' maxima. Step time: median of the slowest rank, as in
benchmarks/train_step.py. The picture (benchmarks/figures/zero3_timeline.png) shows one step of
"local no-overlap" and "local overlap" on every rank.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import dtensor_plus as dtp  # noqa: E402
from dtensor_plus.layouts import fully_shard  # noqa: E402
from dtensor_plus.layouts.data import shard_batch  # noqa: E402
from gpt import GPT, PRESETS  # noqa: E402
from layout_setups import LR, place_torch  # noqa: E402

VARIANTS = {
    "dtensor no-overlap": dict(local_compute=False, overlap=False),
    "dtensor overlap": dict(local_compute=False, overlap=True),
    "local no-overlap": dict(local_compute=True, overlap=False),
    "local overlap": dict(local_compute=True, overlap=True),
}
DRAWN = ("local no-overlap", "local overlap")


def place(model, options):
    mesh = dtp.init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    dtp.distribute_module(model, mesh)  # the causal-mask buffers too: fully_shard places only parameters
    for block in model.blocks:
        fully_shard(block, mesh, **options)
    fully_shard(model, mesh, **options)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, foreach=False)
    return model, opt, mesh


def step_ours(model, opt, mesh, tokens, targets):
    x, y = shard_batch(tokens, mesh), shard_batch(targets, mesh)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(0, 1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_torch(placed, tokens, targets):
    x, y = placed.inputs(tokens, targets)
    loss = F.cross_entropy(placed.model(x).flatten(0, 1), y.flatten(0, 1))
    loss.backward()
    placed.opt.step()
    placed.opt.zero_grad(set_to_none=True)


def run_ours(config, options, batches, warmup):
    torch.manual_seed(0)
    model, opt, mesh = place(GPT(config), options)
    schedule = model._zero_state.schedule
    for tokens, targets in batches[:warmup]:
        step_ours(model, opt, mesh, tokens, targets)
    times, exposed, steps = [], [], []
    for tokens, targets in batches[warmup:]:
        dist.barrier()
        schedule.timeline = []
        start = time.perf_counter()
        step_ours(model, opt, mesh, tokens, targets)
        end = time.perf_counter()
        times.append(end - start)
        waits = [e for e in schedule.timeline if e[0].startswith("wait")]
        exposed.append(sum(b - a for _, _, a, b in waits))
        steps.append((start, end, schedule.timeline))
        schedule.timeline = None
    return times, exposed, steps


def run_torch(config, batches, warmup):
    torch.manual_seed(0)
    placed = place_torch("zero-3", GPT(config), dist.get_world_size())
    times = []
    for i, (tokens, targets) in enumerate(batches):
        dist.barrier()
        start = time.perf_counter()
        step_torch(placed, tokens, targets)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def slowest_median(values) -> float:
    t = torch.tensor([statistics.median(values)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def draw(path: Path, drawn: dict, world: int) -> None:
    """One step per variant in ``drawn`` ({name: [(start, end, timeline) per rank]}), a row per rank."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    colors = {"forward": "#9ecae1", "wait all-gather": "#d62728", "wait re-gather": "#ff7f0e",
              "wait reduce-scatter": "#9467bd"}
    fig = Figure(figsize=(11, 1.0 + 0.55 * world * len(drawn)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels, row = [], 0
    for name, per_rank in drawn.items():
        for rank, (start, end, timeline) in enumerate(per_rank):
            y = -row
            ax.broken_barh([(0, (end - start) * 1e3)], (y - 0.35, 0.7), facecolors="#eeeeee", edgecolor="#999999")
            for what, unit, a, b in timeline:
                if what == "forward" and unit == "GPT":
                    continue  # the root's forward spans the whole forward: drawn through its blocks
                if what in colors:
                    h = 0.5 if what == "forward" else 0.7
                    ax.broken_barh([((a - start) * 1e3, max((b - a) * 1e3, 0.05))], (y - h / 2, h), facecolors=colors[what])
                elif what == "reduce-scatter issued":
                    ax.plot([(a - start) * 1e3] * 2, [y - 0.4, y + 0.4], color="#2ca02c", lw=1.2)
            labels.append((y, f"{name}\nrank {rank}"))
            row += 1
        row += 0.5
    ax.set_yticks([y for y, _ in labels], [text for _, text in labels], fontsize=8)
    ax.set_xlabel("ms since the step began (forward, backward, optimizer step)")
    ax.set_title("fully_shard: one training step per rank; red/orange/purple = waiting on a collective (exposed)")
    handles = [Patch(color=c, label=k) for k, c in colors.items()]
    handles.append(Patch(color="#2ca02c", label="reduce-scatter issued"))
    handles.append(Patch(facecolor="#eeeeee", edgecolor="#999999", label="step"))
    ax.legend(handles=handles, fontsize=7, loc="lower right", ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="debug", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--figure", default=str(Path(__file__).resolve().parent / "figures" / "zero3_timeline.png"))
    parser.add_argument("--no-figure", action="store_true")
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    world, rank0 = dist.get_world_size(), dist.get_rank() == 0
    config = PRESETS[args.config]
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.warmup + args.steps):
        x = torch.randint(0, config.vocab_size, (args.batch_size, config.block_size), generator=g)
        batches.append((x, torch.roll(x, -1, 1)))
    # FSDP2 before and after ours: the ratio is over their mean, so drifting load on the shared machine shows.
    t_torch = [slowest_median(run_torch(config, batches, args.warmup))]
    rows, drawn = [], {}
    for name in args.variants.split(","):
        times, exposed, steps = run_ours(config, VARIANTS[name], batches, args.warmup)
        rows.append((name, slowest_median(times), slowest_median(exposed)))
        if name in DRAWN:
            everyone = [None] * world
            dist.all_gather_object(everyone, steps[len(steps) // 2])
            drawn[name] = everyone
    t_torch.append(slowest_median(run_torch(config, batches, args.warmup)))
    ref = statistics.mean(t_torch)
    lines = [f"GPT {args.config}, batch {args.batch_size}, {world} ranks (gloo, CPU); FSDP2 step "
             f"{t_torch[0] * 1e3:.1f} ms before ours, {t_torch[1] * 1e3:.1f} ms after (ratios over their mean)",
             f"{'variant':<22}{'step ms':>9}{'/FSDP2':>8}{'exposed comm ms':>17}{'exposed/step':>14}"]
    for name, t, e in rows:
        lines.append(f"{name:<22}{t * 1e3:>9.1f}{t / ref:>8.2f}{e * 1e3:>17.1f}{e / t:>14.2f}")
    if rank0:
        print("\n".join(lines), flush=True)
        if drawn and not args.no_figure:
            draw(Path(args.figure), drawn, world)
            print(f"timeline: {args.figure}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

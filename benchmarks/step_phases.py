"""One training step split into phases, dtensor_plus beside PyTorch's stack, CPU time per phase (medians).

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 benchmarks/step_phases.py dp --steps 30

benchmarks/train_step.py times whole steps on the wall clock; on a shared machine the load of other jobs moves
those by more than the few percent a change to data parallelism or ZeRO-1 makes. Here ours and torch's step
alternate in one process (each step after a barrier) and each phase is timed with ``time.process_time``
(``--wall``: perf_counter): inputs (the global batch to the model's inputs), forward, loss, backward, optimizer
step, zero_grad. Rank 0 prints each phase's median for both and their difference: where ours spends more.
Layouts and placement are benchmarks/layout_setups.py's (the GPT of examples/gpt.py, AdamW, fp32).
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

from gpt import GPT, PRESETS  # noqa: E402
from layout_setups import LAYOUTS, place_ours, place_torch  # noqa: E402

PHASES = ("inputs", "forward", "loss", "backward", "step", "zero_grad", "total")


def timed_step(placed, tokens, targets, clock, record: dict) -> None:
    marks = [clock()]
    x, y = placed.inputs(tokens, targets)
    marks.append(clock())
    with placed.loss_ctx():
        out = placed.model(x)
        marks.append(clock())
        loss = F.cross_entropy(out.flatten(0, 1), y.flatten(0, 1))
        marks.append(clock())
        loss.backward()
    marks.append(clock())
    placed.after_backward()
    placed.opt.step()
    marks.append(clock())
    placed.opt.zero_grad(set_to_none=True)
    marks.append(clock())
    spans = [b - a for a, b in zip(marks, marks[1:])] + [marks[-1] - marks[0]]
    for phase, span in zip(PHASES, spans):
        record.setdefault(phase, []).append(span)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("layout", choices=LAYOUTS)
    parser.add_argument("--config", default="debug", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--wall", action="store_true", help="time with perf_counter instead of process_time")
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    config, clock = PRESETS[args.config], time.perf_counter if args.wall else time.process_time
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, config.vocab_size, (args.batch_size, config.block_size), generator=g) for _ in range(4)]
    batches = [(x, torch.roll(x, -1, 1)) for x in tokens]
    placed = {}
    for name, placer in (("ours", place_ours), ("torch", place_torch)):
        torch.manual_seed(0)
        placed[name] = placer(args.layout, GPT(config), dist.get_world_size())
    records = {name: {} for name in placed}
    for name, p in placed.items():  # warm-up: plans cached, optimizer state made
        for batch in batches[:2]:
            timed_step(p, *batch, clock, {})
    for i in range(args.steps):
        for name, p in placed.items():
            dist.barrier()
            timed_step(p, *batches[i % len(batches)], clock, records[name])
    if dist.get_rank() == 0:
        print(f"{args.layout}, {args.config}, {dist.get_world_size()} ranks: median ms per phase "
              f"({'wall' if args.wall else 'CPU'} time), {args.steps} steps each, alternating")
        for phase in PHASES:
            ours, theirs = (statistics.median(records[name][phase]) * 1e3 for name in ("ours", "torch"))
            print(f"{phase:10s} ours {ours:7.2f}  torch {theirs:7.2f}  diff {ours - theirs:+6.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

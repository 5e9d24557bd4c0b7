"""python -m dtensor_plus.plan: the best layouts of a GPT on a named cluster, and why the others lost.

    python -m dtensor_plus.plan --model gpt3-175b --gpus 1024 --cluster a100 --global-batch 1536 --report plan.png

--model: a GPT_PRESETS name (gpt3-175b, megatron-*, mt-nlg-530b, tiny) or one of examples/gpt.py's PRESETS
(debug, small, ...). Prints the ranked table (layout, step time, tokens/s, MFU, memory per device, exposed
communication by mesh dim, bubble), each losing family's reason, and the winner as data (mesh shape, tp plan,
examples/train_gpt.py flags). --report draws the picture (dtensor_plus.plan.report; needs matplotlib).
"""

from __future__ import annotations

import argparse
import sys
import time

from .hardware import CLUSTERS
from .report import MatplotlibMissing, write_report
from .search import SearchSpace, search
from .workload import GPT_PRESETS, gpt_workload

GIB = 1 << 30


def workload_named(name: str, seq_len: int | None = None):
    """A GPT_PRESETS entry, else one of examples/gpt.py's PRESETS (its GPTConfig fields, float32); ``seq_len``
    replaces the preset's sequence length (block_size)."""
    from dataclasses import asdict

    if name in GPT_PRESETS:
        if seq_len is None:
            return gpt_workload(name)
        return gpt_workload(dict(GPT_PRESETS[name], block_size=seq_len, name=name))
    from .workload import _examples  # examples/gpt.py as gpt_workload loads it

    presets = _examples()[0].PRESETS
    if name not in presets:
        raise SystemExit(f"unknown --model {name!r}; known: {sorted(GPT_PRESETS)} and examples/gpt.py's "
                         f"{sorted(presets)}")
    fields = asdict(presets[name])
    return gpt_workload(dict(fields, name=name, block_size=seq_len or fields["block_size"]))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dtensor_plus.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="GPT_PRESETS name or examples/gpt.py preset")
    parser.add_argument("--gpus", type=int, required=True, help="world size (ranks)")
    parser.add_argument("--cluster", default="a100", choices=sorted(CLUSTERS))
    parser.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    parser.add_argument("--memory-gib", type=float, default=None, help="memory per device (default: the cluster's)")
    parser.add_argument("--top", type=int, default=10, help="plans to print")
    parser.add_argument("--train-gpt", action="store_true",
                        help="only layouts examples/train_gpt.py runs (no recompute/offload, its mesh order)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the preset's)")
    parser.add_argument("--report", default=None, metavar="PNG", help="write the picture here")
    parser.add_argument("--flags-out", default=None, metavar="JSON",
                        help="write the winner as JSON (layout, train_gpt flags, step time) for programs, e.g. "
                             "examples/train_gpt.py --auto")
    args = parser.parse_args(argv)
    for name in ("gpus", "global_batch", "top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    workload = workload_named(args.model, args.seq_len)
    memory = int(args.memory_gib * GIB) if args.memory_gib is not None else None
    space = SearchSpace.train_gpt(args.global_batch) if args.train_gpt else None
    result = search(workload, args.gpus, CLUSTERS[args.cluster], args.global_batch, memory, top=args.top, space=space)
    print(result.table())
    if args.report:
        try:
            print(f"\nreport: {write_report(result, args.report)}")
        except MatplotlibMissing as err:
            print(f"\nreport not written: {err}", file=sys.stderr)
            return 1
    if args.flags_out and result.plans:
        _write_winner(result, args.flags_out)
    print(f"\n(planned in {time.perf_counter() - started:.1f} s, search {result.seconds:.1f} s)")
    return 0 if result.plans else 2


def _write_winner(result, path: str) -> None:
    import json

    best = result.winner
    try:
        flags = result.train_gpt_flags()
    except ValueError:
        flags = None  # train_gpt cannot run it: JSON null (--train-gpt restricts the search to what it can)
    runner_up = result.plans[1] if len(result.plans) > 1 else None
    why = (f"predicted {best.step_time:.4g} s a step ({best.tokens_per_s:,.0f} tokens/s), fastest of "
           f"{result.priced} layouts priced" + (f"; next: {runner_up.layout} at {runner_up.step_time:.4g} s"
                                                if runner_up else ""))
    with open(path, "w") as f:
        json.dump(dict(layout=str(best.layout), train_gpt_flags=flags, step_time=best.step_time, why=why), f)


if __name__ == "__main__":
    sys.exit(main())

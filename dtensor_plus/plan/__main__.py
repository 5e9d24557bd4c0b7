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


def workload_named(name: str):
    """A GPT_PRESETS entry, else one of examples/gpt.py's PRESETS (its GPTConfig fields, float32)."""
    if name in GPT_PRESETS:
        return gpt_workload(name)
    from dataclasses import asdict

    from .workload import _examples  # examples/gpt.py as gpt_workload loads it

    presets = _examples()[0].PRESETS
    if name not in presets:
        raise SystemExit(f"unknown --model {name!r}; known: {sorted(GPT_PRESETS)} and examples/gpt.py's "
                         f"{sorted(presets)}")
    return gpt_workload(dict(asdict(presets[name]), name=name))


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
    parser.add_argument("--report", default=None, metavar="PNG", help="write the picture here")
    args = parser.parse_args(argv)
    for name in ("gpus", "global_batch", "top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    workload = workload_named(args.model)
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
    print(f"\n(planned in {time.perf_counter() - started:.1f} s, search {result.seconds:.1f} s)")
    return 0 if result.plans else 2


if __name__ == "__main__":
    sys.exit(main())

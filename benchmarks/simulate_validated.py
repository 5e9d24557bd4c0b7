"""What ``simulate(..., validated=True)`` saves: one replay, and partition_layers' whole search (which validates
its schedule once and replays it under every cost table it tries), against re-validating on every replay.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/simulate_validated.py

Process CPU time, median of ``--repeats``, both variants interleaved in the same run (ratios, not absolutes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from balanced_pipeline_gpt import gpt_cost_model  # noqa: E402
from dtensor_plus.layouts.pipeline import partition  # noqa: E402
from dtensor_plus.layouts.pipeline.layer_costs import simulated_layer_costs  # noqa: E402
from dtensor_plus.layouts.pipeline.schedules import one_f_one_b  # noqa: E402
from dtensor_plus.layouts.pipeline.simulate import simulate  # noqa: E402
from pipeline_partition import PRESETS  # noqa: E402


def revalidating(schedule, costs=None, *args, validated=False, **kwargs):
    """simulate as it was before the keyword: validating every call."""
    return simulate(schedule, costs, *args, **kwargs)


def cpu_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    plan = one_f_one_b(4, 8)
    one = cpu_ms(lambda: simulate(plan, validated=True), args.repeats * 20)
    again = cpu_ms(lambda: revalidating(plan), args.repeats * 20)
    print(f"| one replay, 1F1B p=4 m=8 | {one:.2f} ms | {again:.2f} ms | {again / one:.2f}x |")
    costs = simulated_layer_costs(gpt_cost_model(PRESETS["big"], micro_batch_size=2))
    for p, m in ((4, 8), (4, 16), (6, 12)):
        found = {}
        for name, fn in (("validated", simulate), ("revalidating", revalidating)):
            partition.simulate = fn  # the module's own name, so the search calls this variant
            found[name] = cpu_ms(lambda: partition.partition_layers(costs, p, m), args.repeats)
        partition.simulate = simulate
        ratio = found["revalidating"] / found["validated"]
        print(f"| partition_layers, {len(costs)} layers, p={p} m={m} | {found['validated']:.0f} ms | "
              f"{found['revalidating']:.0f} ms | {ratio:.2f}x |")


if __name__ == "__main__":
    main()

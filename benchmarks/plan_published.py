"""The planner against the published large runs (issue 20 item 5): for each run of
``dtensor_plus.plan.published.PUBLISHED``, the cost model's prediction for the published layout and the planner's
own choice for the same model, GPUs, global batch and 80 GiB A100s, both as TFLOP/s per GPU by the paper's formula.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/plan_published.py [--rows 0,9]

Both figures are predictions of one cost model (``dtensor_plus.plan.cost``): "planner / published" says whether
the search finds a layout the model prices at least as fast as the one the paper ran, not that it would be.
"""

from __future__ import annotations

import argparse
import time

from dtensor_plus.plan import CLUSTERS, gpt_workload, search
from dtensor_plus.plan.published import PUBLISHED, compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=None, help="comma-separated indices into PUBLISHED (default: all)")
    args = parser.parse_args()
    runs = PUBLISHED if args.rows is None else tuple(PUBLISHED[int(i)] for i in args.rows.split(","))
    cluster = CLUSTERS["a100"]
    print("| model | GPUs | batch | published layout | published TFLOP/s/GPU | predicted (published layout) | "
          "planner's choice | predicted (planner) | planner / published layout | fits | search s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for comparison in compare(cluster, runs):
        run = comparison.run
        workload = gpt_workload(run.model)
        started = time.perf_counter()
        result = search(workload, run.gpus, cluster, run.global_batch)
        seconds = time.perf_counter() - started
        flops = workload.published_flops(run.global_batch * workload.seq_len)
        best = result.winner
        # the paper's formula counts the recomputation it ran: the planner's choice is credited the same FLOPs
        planner_tflops = best.tflops_per_gpu(flops)
        print(f"| {run.model} | {run.gpus} | {run.global_batch} | tp{run.tp} pp{run.pp} dp{run.gpus // (run.tp * run.pp)}"
              f" | {run.tflops_per_gpu:g} | {comparison.predicted_tflops_per_gpu:.0f} | {best.layout} | "
              f"{planner_tflops:.0f} | {planner_tflops / comparison.predicted_tflops_per_gpu:.2f} | "
              f"{'yes' if best.fits else 'no'} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""Dispatch overhead, two trees side by side: benchmarks/dispatch_overhead.py's ops timed in a "before" and an
"after" process kept alive together, interleaved op by op, so load from other jobs falls on both alike.

    flock /tmp/bench.lock .venv/bin/python benchmarks/dispatch_overhead_ab.py BEFORE_TREE AFTER_TREE [ROUNDS] [CALLS]

e.g. BEFORE_TREE from `git worktree add /tmp/base HEAD~3`, AFTER_TREE the working tree. Each worker imports the
dtensor_plus of its tree and that tree's benchmarks/dispatch_overhead.py op table (local torch, the bare wrapper
floor, torch DTensor, dtensor_plus). Per round, every op's four cells are timed in both workers, the order of the
two trees alternating by round. Prints a Markdown table: cells are medians over rounds, ratios medians of
per-round ratios (ours / torch DTensor, ours / bare wrapper, each against the same worker's cells). Cells are
the worker thread's CPU time (time.thread_time), not wall time: on a machine shared with other jobs, the time a
worker waits for a core is theirs, not the framework's (1 rank: no collective waits on another thread).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

COLUMNS = ("local", "bare", "torch", "ours")


def _worker() -> None:
    """Answer "column calls op" lines with microseconds per call (nan where the op fails)."""
    import tempfile
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
    import dispatch_overhead as bench

    import dtensor_plus as dtp

    dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(), 1), rank=0, world_size=1)
    torch.manual_seed(0)
    ops = {"ours": bench._distributed_ops(dtp.distribute_tensor, dtp.init_device_mesh("cpu", (1,)), dtp.Shard, dtp.Replicate),
           "torch": bench._distributed_ops(distribute_tensor, init_device_mesh("cpu", (1,)), Shard, Replicate),
           "local": bench._local_ops(), "bare": bench._local_ops(bench._bare)}
    print("|".join(ops["ours"]), flush=True)  # the op names, in order
    for line in sys.stdin:
        column, calls, name = line.rstrip("\n").split(" ", 2)
        fn = ops[column][name]
        try:
            for _ in range(10):
                fn()
            start = time.thread_time()
            for _ in range(int(calls)):
                fn()
            print((time.thread_time() - start) / int(calls) * 1e6, flush=True)
        except Exception:  # noqa: BLE001 - the op fails there: n/a in the table
            print("nan", flush=True)


def _start(tree: str):
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], env=env, cwd=tree, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return proc, proc.stdout.readline().rstrip("\n").split("|")


def main(before: str, after: str, rounds: int, calls: int) -> None:
    workers, names = {}, None
    for label, tree in (("before", before), ("after", after)):
        workers[label], names = _start(tree)
    times = {(label, column, name): [] for label in workers for column in COLUMNS for name in names}
    for r in range(rounds):
        for name in names:
            n = calls if "+bwd" not in name else max(calls // 4, 50)
            for label in (("before", "after") if r % 2 == 0 else ("after", "before")):
                for column in COLUMNS:
                    proc = workers[label]
                    proc.stdin.write(f"{column} {n} {name}\n")
                    proc.stdin.flush()
                    times[(label, column, name)].append(float(proc.stdout.readline()))
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()

    def ratio(label, name, column):
        return statistics.median(o / t for o, t in zip(times[(label, "ours", name)], times[(label, column, name)]))

    def flag(x):
        return f"**{x:.2f}**" if x > 1.2 else f"{x:.2f}"

    print(f"{rounds} rounds, {calls} calls per cell (+bwd rows {max(calls // 4, 50)}); microseconds, medians over rounds")
    print("| op | local | bare (floor) | torch DTensor | before | after | before/torch | after/torch | before/floor | after/floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    geo = {"before": [], "after": []}
    within = {"before": 0, "after": 0}
    for name in names:
        both = {c: statistics.median(times[("before", c, name)] + times[("after", c, name)]) for c in ("local", "bare", "torch")}
        to_torch = {label: ratio(label, name, "torch") for label in workers}
        to_floor = {label: ratio(label, name, "bare") for label in workers}
        for label in workers:
            if to_torch[label] == to_torch[label]:
                geo[label].append(to_torch[label])
            within[label] += to_floor[label] <= 1.2
        ours = {label: statistics.median(times[(label, "ours", name)]) for label in workers}
        print(f"| {name} | {both['local']:.1f} | {both['bare']:.1f} | {both['torch']:.1f} | {ours['before']:.1f} | "
              f"{ours['after']:.1f} | {to_torch['before']:.2f} | {to_torch['after']:.2f} | {flag(to_floor['before'])} | "
              f"{flag(to_floor['after'])} |".replace("nan", "n/a"))
    print(f"geo-mean over torch DTensor ({len(geo['after'])} ops both run): before "
          f"{statistics.geometric_mean(geo['before']):.2f}, after {statistics.geometric_mean(geo['after']):.2f}")
    print(f"within 1.2x of the floor: before {within['before']}, after {within['after']} of {len(names)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker()
    else:
        args = sys.argv[1:]
        main(os.path.abspath(args[0]), os.path.abspath(args[1]), int(args[2]) if len(args) > 2 else 11,
             int(args[3]) if len(args) > 3 else 300)

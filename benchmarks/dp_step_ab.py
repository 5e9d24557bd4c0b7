"""Data parallelism's per-step CPU overhead, before and after a change, in ONE process: replicate's local forward,
flat buckets and local step as of a git commit beside the working tree's, alternating steps.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 benchmarks/dp_step_ab.py --before f13e303

benchmarks/step_phases.py puts ours beside DDP; on a shared machine its per-phase differences move by +-0.2 ms
between runs, as much as a change to layouts/data_local.py, data_flat.py or local_step.py saves. Here two copies
of the debug GPT (examples/gpt.py, AdamW, fp32, foreach=False) train side by side under ``replicate``: one built
with those three modules as they were at ``--before`` (read with ``git show``), one with the working tree's. Their
steps alternate (each after a barrier) and each phase is timed with ``time.thread_time``; rank 0 prints the
medians and their difference. Both copies must end bit-equal (the change kept every value), else it exits 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.optim.optimizer as optimizer_hooks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import dtensor_plus as dtp  # noqa: E402
from dtensor_plus.layouts import data, data_flat, data_local, local_step  # noqa: E402
from gpt import GPT, PRESETS  # noqa: E402

MODULES = ("data_local", "data_flat", "local_step")
PHASES = ("forward", "loss", "backward", "step")


def modules_at(commit: str, folder: Path) -> dict:
    """The three modules as they were at ``commit``, imported under other names inside dtensor_plus.layouts."""
    loaded = {}
    for name in MODULES:
        path = folder / f"{name}.py"
        path.write_text(subprocess.run(["git", "show", f"{commit}:layouts/{name}.py"], cwd=ROOT, check=True,
                                       capture_output=True, text=True).stdout)
        spec = importlib.util.spec_from_file_location(f"dtensor_plus.layouts._before_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        loaded[name] = module
    return loaded


def placed(mesh, config, flat_class, local_class):
    """A GPT under replicate whose forward and buckets are ``local_class`` and ``flat_class`` (the buckets are
    made at the first forward: it runs here, inside the swap)."""
    data.FlatGradients, data.LocalCompute = flat_class, local_class
    try:
        torch.manual_seed(0)
        model = data.replicate(GPT(config), mesh)
        model(data.shard_batch(torch.zeros(2 * mesh.size(0), config.block_size, dtype=torch.long), mesh))
    finally:
        data.FlatGradients, data.LocalCompute = data_flat.FlatGradients, data_local.LocalCompute
    local = next(h.__self__ for h in model._forward_pre_hooks.values() if type(getattr(h, "__self__", None)) is local_class)
    assert type(local.gradients.flat) is flat_class, "the buckets are not the version asked for"
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)


def route_step_hooks(hooks: dict, current: list) -> None:
    """local_step's global hooks, installed once, call the version of the model being stepped."""
    for table, i in ((optimizer_hooks._global_optimizer_pre_hooks, 0), (optimizer_hooks._global_optimizer_post_hooks, 1)):
        for key, hook in list(table.items()):
            if hook in (local_step._pre_step, local_step._post_step):
                table[key] = lambda *args, i=i: hooks[current[0]][i](*args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the git commit whose three modules are the baseline")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    mesh = dtp.init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    config = PRESETS["debug"]
    with tempfile.TemporaryDirectory() as folder:
        before = modules_at(args.before, Path(folder))
        versions = {"before": placed(mesh, config, before["data_flat"].FlatGradients, before["data_local"].LocalCompute),
                    "after": placed(mesh, config, data_flat.FlatGradients, data_local.LocalCompute)}
    current = ["after"]
    route_step_hooks({"before": (before["local_step"]._pre_step, before["local_step"]._post_step),
                      "after": (local_step._pre_step, local_step._post_step)}, current)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, config.vocab_size, (args.batch_size, config.block_size), generator=g) for _ in range(4)]
    records = {name: {phase: [] for phase in PHASES} for name in versions}

    def step(name, x, record):
        model, opt = versions[name]
        current[0] = name
        marks = [time.thread_time()]
        out = model(data.shard_batch(x, mesh))
        marks.append(time.thread_time())
        loss = F.cross_entropy(out.flatten(0, 1), data.shard_batch(torch.roll(x, -1, 1), mesh).flatten(0, 1))
        marks.append(time.thread_time())
        loss.backward()
        marks.append(time.thread_time())
        opt.step()
        marks.append(time.thread_time())
        opt.zero_grad(set_to_none=True)
        if record:
            for phase, a, b in zip(PHASES, marks, marks[1:]):
                records[name][phase].append(b - a)

    for i in range(6):  # warm-up: plans cached, optimizer state made, memos found
        for name in versions:
            step(name, tokens[i % 4], False)
    for i in range(args.steps):
        for name in (("before", "after") if i % 2 else ("after", "before")):
            dist.barrier()
            step(name, tokens[i % 4], True)
    equal = all(torch.equal(p.full_tensor(), q.full_tensor())
                for p, q in zip(versions["before"][0].parameters(), versions["after"][0].parameters()))
    if dist.get_rank() == 0:
        print(f"dp, debug, {dist.get_world_size()} ranks: median CPU ms per phase, {args.steps} steps each, "
              f"alternating; before = layouts/{{{','.join(MODULES)}}}.py at {args.before}")
        for phase in PHASES:
            b, a = (statistics.median(records[name][phase]) * 1e3 for name in ("before", "after"))
            print(f"{phase:9s} before {b:6.3f}  after {a:6.3f}  after-before {a - b:+6.3f}")
        print("parameters after training:", "bit-equal" if equal else "DIFFER")
    dist.destroy_process_group()
    if not equal:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""``examples/train_gpt.py --auto``: the planner picks the layout for the ranks the run is given.

The planner (``python -m dtensor_plus.plan --train-gpt``, cluster "cpu", only the layouts train_gpt runs) works in a
fresh process on rank 0; the other ranks receive its answer over the run's process group.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

AUTO_FLAGS = ("--dp", "--tp", "--sp", "--zero", "--cp", "--pp", "--schedule", "--microbatches")


def auto_flags(args, world: int) -> list[str]:
    """The layout flags the planner picks for ``world`` ranks of the 'cpu' cluster: ``python -m dtensor_plus.plan
    --train-gpt`` (only what this script runs) in a fresh process, because the planner simulates the model in a
    world of its own, which a process already in a process group cannot start. Rank 0 plans and prints the table;
    the other ranks get its answer over the process group (started here under torchrun), so all run one layout."""
    import json
    import subprocess
    import tempfile

    dist = torch.distributed
    if world > 1 and not dist.is_initialized() and "MASTER_ADDR" in os.environ:
        dist.init_process_group("gloo")  # torchrun: the group init_device_mesh will use later
    answer = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "winner.json")
            command = [sys.executable, "-m", "dtensor_plus.plan", "--model", args.config, "--gpus", str(world),
                       "--cluster", "cpu", "--global-batch", str(args.batch_size), "--train-gpt", "--top", "5",
                       "--flags-out", out] + (["--seq-len", str(args.seq_len)] if args.seq_len else [])
            # the planner's own (simulated) world: none of this run's torchrun variables
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                                     "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
            env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            print(done.stdout, end="")
            if done.returncode or not os.path.isfile(out):
                answer[0] = {"error": f"the planner failed ({' '.join(command)}):\n{done.stderr[-4000:]}"}
            else:
                with open(out) as f:
                    answer[0] = json.load(f)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    winner = answer[0]
    if "error" in winner:
        raise SystemExit(winner["error"])
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"--auto chose {winner['layout']}: {winner['why']}\n--auto flags: {' '.join(winner['train_gpt_flags'])}")
    return _layout_only(winner["train_gpt_flags"])


def _layout_only(flags: list[str]) -> list[str]:
    """The planner's flags without --batch-size (the run's own is already on the command line)."""
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag == "--batch-size":
            skip = True
        else:
            out.append(flag)
    return out

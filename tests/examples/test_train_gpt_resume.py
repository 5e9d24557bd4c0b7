"""Issue 9's resumable training: examples/train_gpt.py saves a sharded checkpoint every N steps; a run whose rank
is SIGKILLed mid-training restarts under ``torchrun --max-restarts`` and ends with the losses and parameters of an
uninterrupted run; a checkpoint saved on dp=2 x tp=2 resumes on tp=4 and on one process with the same losses.
(The mesh runs equal the single-process run trained beside them, so "the same as uninterrupted" is checked
against that one, step by step.)
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from dtensor_plus.testing import run_on_ranks

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import train_gpt  # noqa: E402

COMMON = ["--batch-size", "4", "--text-bytes", str(1 << 16)]


def _main(argv):
    return train_gpt.main(argv)


def _assert_like_one_device(result, steps):
    assert len(result.mesh_losses) == steps
    torch.testing.assert_close(torch.tensor(result.mesh_losses), torch.tensor(result.single_losses), atol=1e-5, rtol=0)
    assert result.max_param_diff < 1e-5, result.max_param_diff


def test_checkpoint_resumes_on_other_layouts(tmp_path):
    ckpt, plot = str(tmp_path / "ckpt"), str(tmp_path / "loss.png")
    saved = run_on_ranks(4, _main, ["--dp", "2", "--tp", "2", "--steps", "3", "--save-every", "3", "--checkpoint", ckpt,
                                    "--plot", plot] + COMMON, timeout=120.0)[0]
    _assert_like_one_device(saved, 3)
    for world, layout in ((4, ["--tp", "4"]), (1, [])):
        resumed = run_on_ranks(world, _main, layout + ["--steps", "5", "--checkpoint", ckpt, "--plot", plot] + COMMON,
                               timeout=120.0)[0]
        assert resumed.mesh_losses[:3] == saved.mesh_losses  # from the checkpoint, not recomputed
        _assert_like_one_device(resumed, 5)


def test_killed_rank_resumes_under_torchrun(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
               str(EXAMPLES / "train_gpt.py"), "--dp", "2", "--steps", "5", "--save-every", "2", "--fail-at-step", "2",
               "--checkpoint", str(tmp_path / "ckpt"), "--plot", str(tmp_path / "loss.png")] + COMMON
    run = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "exitcode: -9" in out  # rank 1 really died (SIGKILL) after step 2
    assert "resumed from" in out and "after step 1" in out  # ... and the restart went on from the step-2 save
    diffs = [float(m) for m in re.findall(r"^\s+\d+\s+[\d.]+\s+[\d.]+\s+([\d.e+-]+)$", run.stdout, re.M)]
    assert len(diffs) == 5 and max(diffs) <= 1e-5, run.stdout[-2000:]
    param_diff = float(re.search(r"max \|param diff\| after 5 steps: ([\d.e+-]+)", run.stdout).group(1))
    assert param_diff < 1e-5

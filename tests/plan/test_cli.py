"""python -m dtensor_plus.plan as a user runs it: a subprocess on the tiny GPT preset, the real cost model."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dtensor_plus.plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_cli_prints_the_ranked_table_the_reasons_and_the_winner_and_draws_the_report(tmp_path):
    picture = tmp_path / "plan.png"
    done = _run("--model", "tiny", "--gpus", "2", "--cluster", "a100", "--global-batch", "4", "--top", "3",
                "--report", str(picture))
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "tiny on 2 x a100" in out and "tokens/s" in out and "exposed comm s by mesh dim" in out
    rows = [line for line in out.splitlines() if line[:2].strip() in ("1", "2", "3")]
    assert len(rows) == 3, out
    assert "why the other families lost:" in out and "winner: " in out and "mesh: init_device_mesh" in out
    assert "examples/train_gpt.py" in out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_names_a_bad_model_and_its_choices():
    done = _run("--model", "gpt-nonexistent", "--gpus", "8", "--global-batch", "8", timeout=300)
    assert done.returncode != 0
    assert "gpt-nonexistent" in done.stderr and "gpt3-175b" in done.stderr and "debug" in done.stderr

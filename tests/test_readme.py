"""Every code block of the README runs as written.

A Python block is a whole program whose first line says how to run it: ``# torchrun --nproc-per-node N name.py``
(run here on a pool of N real gloo ranks, the block's source executed as ``__main__`` in each) or
``# python name.py`` (run here as that script in a fresh process). Bash blocks run as written under
``-m slow`` (they train for a minute, and one of them is this test suite's own command, which CI runs anyway).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dtensor_plus.testing import run_on_ranks

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)
_RUN_LINE = re.compile(r"^# (?:torchrun --nproc-per-node (\d+)|python) (\w+\.py)$")


def _blocks(language):
    return [body for lang, body in _BLOCK.findall((ROOT / "README.md").read_text()) if lang == language]


PYTHON_BLOCKS = _blocks("python")


def _exec_as_main(source: str, name: str) -> None:
    exec(compile(source, name, "exec"), {"__name__": "__main__", "__file__": name})


def test_every_python_block_says_how_to_run_it():
    assert len(PYTHON_BLOCKS) >= 4
    for body in PYTHON_BLOCKS:
        assert _RUN_LINE.match(body.splitlines()[0]), f"first line must say how to run the block:\n{body[:200]}"


@pytest.mark.parametrize("body", PYTHON_BLOCKS, ids=[_RUN_LINE.match(b.splitlines()[0]).group(2) if _RUN_LINE.match(b.splitlines()[0]) else "?" for b in PYTHON_BLOCKS])
def test_python_block_runs_as_written(body, tmp_path):
    ranks, name = _RUN_LINE.match(body.splitlines()[0]).groups()
    if ranks is not None:
        run_on_ranks(int(ranks), _exec_as_main, body, name, timeout=120)
        return
    script = tmp_path / name
    script.write_text(body)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def _bash_lines():
    lines = [line for body in _blocks("bash") for line in body.splitlines() if line.strip()]
    return [line for line in lines if "pytest" not in line]  # the suite's own command: CI runs exactly it


@pytest.mark.slow
@pytest.mark.parametrize("line", _bash_lines())
def test_bash_line_runs_as_written(line, tmp_path):
    result = subprocess.run(["bash", "-c", line], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_bash_blocks_use_the_set_up_environment():
    """Commands name `.venv/bin/...`: a bare `python` or `torchrun` may be one without torch."""
    for line in _bash_lines():
        for word in re.findall(r"(?:^|\s)(python3?|torchrun|pytest)\s", line):
            pytest.fail(f"README command runs a bare {word!r}: use .venv/bin/{word}: {line}")

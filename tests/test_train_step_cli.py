"""benchmarks/train_step.py's command line, in-process and without a GPU: which layouts a world size can make,
and the clear stops (unknown layout, --device cuda without CUDA, more ranks than GPUs) before any process
group exists. benchmarks/gpu/run.sh runs the CUDA path itself on a GPU machine."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_step():
    # train_step.py puts benchmarks/ first on sys.path, where its kernels.py would hide the installed
    # ``kernels`` package from later tests: import it, then give back the path as it was.
    saved = list(sys.path)
    sys.path.append(str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("train_step")
    finally:
        sys.path[:] = saved


def test_layouts_skipped_exactly_where_their_mesh_cannot_be_made(train_step):
    from layout_setups import LAYOUTS, mesh_shape, unfit_reason

    for world in range(1, 9):
        for layout in LAYOUTS:
            shape = mesh_shape(layout, world)
            makes = min(shape.values()) >= 1 and torch.Size(shape.values()).numel() == world
            reason = unfit_reason(layout, world)
            assert (reason is None) == makes, (layout, world, shape, reason)
            assert reason is None or f"not {world}" in reason
        # every layout but dp x tp+sp (dp fixed at 2) runs at any world size, 1 included
        fits = [layout for layout in LAYOUTS if unfit_reason(layout, world) is None]
        assert fits == [layout for layout in LAYOUTS if layout != "dp x tp+sp" or world % 2 == 0]


def test_clear_stops_before_any_process_group(train_step, monkeypatch, capsys):
    with pytest.raises(SystemExit) as stop:
        train_step.main(["--layouts", "dp,zero-4"])
    assert stop.value.code == 2 and "unknown layout(s) ['zero-4']" in capsys.readouterr().err

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="^CUDA is not available: .*run with --device cpu"):
        train_step.main(["--device", "cuda"])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit, match="this machine has 1: launch at most --nproc-per-node 1"):
        train_step.main(["--device", "cuda"])
    assert not torch.distributed.is_initialized()

"""Every schedule of ``registry.SCHEDULES`` trains the GPT of examples/ on 2 gloo ranks equal to one device: two
AdamW steps from the same weights, every loss and every final parameter (examples/pipeline_gpt.py's
``compare_pipeline_with_single``). 4 microbatches: DualPipeV's least on 2 ranks (2p), and one Chimera basic unit
pair (m a multiple of p, the list-scheduled order). By default V-Half (the building-block order, new to the executor;
Chimera's and DualPipeV's execution paths run by default in test_paper_schedules_run.py); the whole registry, one
spawn, under -m slow.
"""

import sys
from pathlib import Path

import pytest
import torch

from dtensor_plus.layouts.pipeline.registry import SCHEDULES
from dtensor_plus.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))

M = 4
DEFAULT = ("v_half",)


def _train_each(names):
    import pipeline_gpt
    from gpt import PRESETS
    from gpt_layouts import Layout

    g = torch.Generator().manual_seed(0)
    batch_list = [(torch.randint(0, 256, (M, 8), generator=g), torch.randint(0, 256, (M, 8), generator=g))
                  for _ in range(2)]
    out = {}
    for name in names:
        out[name] = pipeline_gpt.compare_pipeline_with_single(
            PRESETS["debug"].replace(dropout=0.0), Layout(), pp=2, schedule=name, n_microbatches=M,
            batch_list=batch_list, lr=1e-2)
    return out


@pytest.mark.parametrize("names", [DEFAULT, pytest.param(tuple(SCHEDULES), marks=pytest.mark.slow)],
                         ids=["default", "registry"])
def test_schedule_trains_gpt_as_one_device(names):
    per_rank = run_on_ranks(2, _train_each, names, timeout=300)
    for name in names:
        losses, single, diff = per_rank[0][name]
        assert len(losses) == 2, name
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(single), atol=1e-5, rtol=1e-5,
                                   msg=lambda e: f"{name}: {e}")
        assert diff < 1e-5, (name, diff)

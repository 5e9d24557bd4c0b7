"""Pipeline parallelism with each stage's module compiled: the schedule sends, receives, runs backward (fused or
split into input and weight gradients) and steps around compiled stages, and training equals one device.

A stage is an ordinary module (examples/pipeline_gpt.py's GPT pieces, laid out inside the stage), so
``torch.compile(stage_module)`` compiles its forward and backward; the executor's transfers stay eager.
"""

import sys
from pathlib import Path

import pytest
import torch

from dtensor_plus.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))


def _compiled_stages_equal_one_device(schedule, tp, sp):
    import torch._dynamo

    import pipeline_gpt
    from gpt import PRESETS
    from gpt_layouts import Layout

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(0)
    batch_list = [(torch.randint(0, 256, (8, 8), generator=g), torch.randint(0, 256, (8, 8), generator=g))
                  for _ in range(2)]
    losses, single, diff = pipeline_gpt.compare_pipeline_with_single(
        PRESETS["debug"].replace(dropout=0.0, num_layers=2), Layout(tp=tp, sp=sp), pp=2, schedule=schedule,
        n_microbatches=2, batch_list=batch_list, lr=1e-2, compile_stages="aot_eager")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single), atol=1e-5, rtol=1e-5)
    assert diff < 1e-5, diff
    return sum(torch._dynamo.utils.counters["graph_break"].values())


@pytest.mark.parametrize("schedule, tp, sp", [
    ("1f1b", 1, False),
    pytest.param("zb_h1", 2, True, marks=pytest.mark.slow),  # input/weight gradients split, tp + sp in the stages
])
def test_compiled_pipeline_stages_train_equal_to_one_device(schedule, tp, sp):
    assert run_on_ranks(2 * tp, _compiled_stages_equal_one_device, schedule, tp, sp, timeout=400) == [0] * (2 * tp)

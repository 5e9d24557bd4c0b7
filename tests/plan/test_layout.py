"""ParallelLayout: the facts a layout must satisfy for a model / world / batch, and the train_gpt flags that run it."""

import os
import sys
from pathlib import Path

import pytest

from dtensor_plus.plan import ParallelLayout

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import train_gpt  # noqa: E402


def test_problems_names_each_broken_divisibility():
    layout = ParallelLayout(dp=4, tp=8, pp=4, micro_batch_size=2)
    found = layout.problems(world=64, num_layers=6, num_heads=12, global_batch=12)
    assert len(found) == 4, found
    text = " | ".join(found)
    assert "128 ranks" in text and "12 heads" in text and "6 layers" in text and "global batch 12" in text
    assert layout.problems(world=128, num_layers=8, num_heads=16, global_batch=16) == []


def test_interleaved_needs_microbatches_multiple_of_pp():
    layout = ParallelLayout(dp=2, pp=4, schedule="interleaved_1f1b", virtual_stages=2)
    assert layout.problems(num_layers=8, global_batch=12)  # 6 microbatches, not a multiple of 4
    assert layout.problems(num_layers=8, global_batch=16) == []
    assert layout.problems(num_layers=4, global_batch=16)  # 4 layers cannot make 8 stages


def test_check_raises_with_every_problem():
    with pytest.raises(ValueError, match="heads.*tp|tp.*heads"):
        ParallelLayout(tp=4).check(num_heads=6)
    assert ParallelLayout(tp=2).check(num_heads=6).tp == 2


def test_ep_must_divide_experts():
    assert ParallelLayout(dp=4, ep=4).problems(experts=6)
    assert ParallelLayout(dp=4, ep=2).problems(experts=6) == []


@pytest.mark.parametrize("layout, batch", [
    (ParallelLayout(dp=2, tp=2, sequence_parallel=True, zero=3, micro_batch_size=4), 8),
    (ParallelLayout(dp=2, cp=2, micro_batch_size=4, order=("pp", "dp", "tp", "cp")), 8),
    (ParallelLayout(pp=2, dp=2, zero=1, micro_batch_size=1, schedule="zb_h1"), 8),
    (ParallelLayout(pp=2, tp=2, micro_batch_size=2, schedule="interleaved_1f1b", virtual_stages=2), 8),
])
def test_train_gpt_flags_parse_back_to_the_layout(layout, batch):
    """The flags are train_gpt's own: its parser reads them back to the same sizes, on the layout's world."""
    flags = layout.to_train_gpt_flags(batch)

    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(layout.world)
    try:
        args = train_gpt.parse_args(flags)
    finally:
        os.environ.pop("WORLD_SIZE") if old is None else os.environ.__setitem__("WORLD_SIZE", old)
    assert (args.dp, args.tp, args.pp, args.cp, args.zero, args.sp) == (
        layout.dp, layout.tp, layout.pp, layout.cp, layout.zero, layout.sequence_parallel)
    assert args.batch_size == batch
    if layout.pp > 1:
        assert args.schedule == layout.schedule and args.microbatches == layout.microbatches(batch)


@pytest.mark.parametrize("layout, what", [
    (ParallelLayout(dp=2, recompute="full"), "recompute"),
    (ParallelLayout(dp=2, offload=True), "offload"),
    (ParallelLayout(dp=2, ep=2), "ep"),
    (ParallelLayout(pp=2, schedule="interleaved_1f1b", virtual_stages=4), "virtual_stages"),
    (ParallelLayout(tp=2, cp=2), "order"),  # default order puts tp innermost; train_gpt puts cp there
    (ParallelLayout(dp=2, micro_batch_size=1), "micro_batch_size"),
])
def test_train_gpt_flags_refuse_what_train_gpt_cannot_run(layout, what):
    with pytest.raises(ValueError, match=what):
        layout.to_train_gpt_flags(8)

"""examples/train_gpt.py --pp 2 --balanced on 2 real gloo ranks: the first rank plans the cut with
``partition_layers`` (simulated per-layer costs of the debug GPT, whose 256-token head outweighs a block) and
shares it, the cut is not the even one, and the pipelined run trains like one device (losses and final
parameters). By default (the planning's fresh process is slow here) a given uneven cut with a recomputing stage
trains like one device; the whole --balanced run is marked slow."""

import contextlib
import io
import sys
from pathlib import Path

import pytest

from dtensor_plus.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import train_gpt  # noqa: E402
from gpt_layouts import Layout  # noqa: E402
from balanced_pipeline_gpt import even_gpt_boundaries, plan_gpt_stages  # noqa: E402
from gpt import GPT, PRESETS  # noqa: E402
from pipeline_gpt import compare_pipeline_with_single, split_gpt  # noqa: E402

TOL = 1e-4  # train_gpt's float32 verdict tolerance


def _balanced(plot):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = train_gpt.main(["--pp", "2", "--balanced", "--steps", "2", "--batch-size", "4", "--microbatches",
                                 "2", "--text-bytes", "65536", "--plot", plot])
    return printed.getvalue(), result


def _given_cut():
    data = train_gpt.stdlib_bytes(limit=1 << 16)
    batch_list = list(train_gpt.batches(data, 2, 4, PRESETS["debug"].block_size, 0))
    return compare_pipeline_with_single(PRESETS["debug"].replace(dropout=0.0), Layout(), pp=2, schedule="1f1b",
                                        n_microbatches=2, batch_list=batch_list, boundaries=(0, 3, 4),
                                        policies=("full", "none"))


def test_given_cut_with_recomputation_trains_like_one_device():
    (losses, single, diff), _ = run_on_ranks(2, _given_cut, timeout=600.0)
    assert len(losses) == 2 and max(abs(a - b) for a, b in zip(losses, single)) <= TOL and diff <= TOL


@pytest.mark.slow
def test_balanced_pipeline_trains_like_one_device(tmp_path):
    (printed, result), (_, other) = run_on_ranks(2, _balanced, str(tmp_path / "loss.png"), timeout=600.0)
    # the head is the heaviest layer: the planner gives it a stage of its own, the even split pairs it with a block
    assert "balanced stages: (0, 3, 4)" in printed and even_gpt_boundaries(2, 2) == (0, 2, 4), printed
    assert result.mesh_losses == other.mesh_losses and len(result.mesh_losses) == 2
    worst = max(abs(a - b) for a, b in zip(result.mesh_losses, result.single_losses))
    assert worst <= TOL and result.max_param_diff <= TOL, result


def test_bad_balanced_requests_are_refused():
    with pytest.raises(SystemExit):
        train_gpt.parse_args(["--balanced"])  # no --pp: nothing to cut
    with pytest.raises(ValueError, match=r"balanced stages are planned for \('gpipe', '1f1b'\)"):
        plan_gpt_stages(PRESETS["debug"], 2, 4, 1, schedule="interleaved_1f1b")
    with pytest.raises(ValueError, match="5 stages cannot each hold one of the 4 layers"):
        plan_gpt_stages(PRESETS["debug"], 5, 4, 1)
    model = GPT(PRESETS["debug"])
    with pytest.raises(ValueError, match=r"3 stages need 4 boundaries, got \(0, 3, 4\)"):
        split_gpt(model, 3, boundaries=(0, 3, 4))
    with pytest.raises(ValueError, match="policies go with boundaries"):
        split_gpt(model, 2, policies=("none", "full"))
    stages = split_gpt(model, 2, boundaries=(0, 3, 4), policies=("full", "none"))
    assert [len(s.blocks) for s in stages] == [2, 0] and stages[1].is_last and not stages[0].is_last

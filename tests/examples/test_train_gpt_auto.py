"""examples/train_gpt.py --auto on 2 real gloo ranks: the planner picks the layout (cluster "cpu", only what
train_gpt runs), rank 0 plans in a fresh process and the other rank gets its answer, and the run it picks
trains like one device."""

import sys
from pathlib import Path

from dtensor_plus.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import train_gpt  # noqa: E402

TOL = 1e-4  # train_gpt's float32 verdict tolerance


def _auto(plot):
    args = train_gpt.parse_args(["--auto", "--steps", "3", "--batch-size", "8", "--text-bytes", "65536",
                                 "--plot", plot])
    result = train_gpt.main(args=args)
    return (args.pp, args.dp, args.tp, args.cp, args.zero, args.sp, args.schedule, args.microbatches), result


def test_auto_picks_a_two_rank_layout_and_trains_like_one_device(tmp_path):
    answers = run_on_ranks(2, _auto, str(tmp_path / "loss.png"), timeout=600.0)
    (chosen, result), (other, _) = answers
    assert chosen == other  # both ranks run the one plan rank 0 made
    pp, dp, tp, cp = chosen[:4]
    assert pp * dp * tp * cp == 2
    worst = max(abs(a - b) for a, b in zip(result.mesh_losses, result.single_losses))
    assert len(result.mesh_losses) == 3 and worst <= TOL and result.max_param_diff <= TOL, result


def test_auto_refuses_layout_flags_next_to_it():
    import pytest

    with pytest.raises(SystemExit):
        train_gpt.parse_args(["--auto", "--tp", "2"])

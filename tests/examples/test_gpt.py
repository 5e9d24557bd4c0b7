"""examples/gpt.py and the command line of examples/train_gpt.py: configuration errors, shapes, and the
README demo's ``main`` end to end on 4 ranks with ZeRO-1 (the one stage the layout table in
test_train_gpt_layouts.py does not cover).
"""

import re
import sys
from pathlib import Path

import pytest
import torch

import dtensor_plus as dtp
from dtensor_plus.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import train_gpt  # noqa: E402
from gpt import GPT, PRESETS, GPTConfig  # noqa: E402
from train_gpt import Layout  # noqa: E402


@pytest.mark.parametrize("changes, match", [
    (dict(dim=10, num_heads=4), "divide by num_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**changes)


def test_gpt_logits_shape_and_sequence_limit():
    config = PRESETS["debug"]
    model = GPT(config)
    tokens = torch.randint(0, config.vocab_size, (2, config.block_size))
    assert model(tokens).shape == (2, config.block_size, config.vocab_size)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, config.block_size + 1, dtype=torch.long))


@pytest.mark.parametrize("kwargs, match", [
    (dict(dp=1, zero=3), "needs dp > 1"),
    (dict(dp=2, sp=True), "needs tp > 1"),
    (dict(dp=2, zero=4), "zero must be"),
    (dict(dp=0), "positive int"),
])
def test_layout_rejects_bad_combinations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Layout(**kwargs)


def test_command_line_checks_world_size(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit):
        train_gpt.parse_args(["--dp", "2"])
    assert "launch with --nproc-per-node 2" in capsys.readouterr().err
    assert train_gpt.parse_args(["--dp", "2", "--tp", "2", "--sp", "--zero", "2"]).layout == Layout(2, 2, True, 2)
    assert train_gpt.parse_args(["--zero", "1"]).layout == Layout(4, 1, False, 1)  # dp left unsaid: the rest
    assert train_gpt.parse_args(["--tp", "2"]).layout == Layout(2, 2)
    assert train_gpt.parse_args(["--config", "small"]).layout == Layout(4)


@pytest.mark.parametrize("argv, match", [
    (["--pp", "2", "--dp", "1"], r"pp\(2\) \* dp\(1\) \* tp\(1\) \* cp\(1\) != world size\(4\)"),
    (["--tp", "3"], r"tp\(3\) \* cp\(1\) = 3 does not divide the world size \(4\)"),
    (["--pp", "2", "--cp", "2"], "not yet with --cp"),
    (["--pp", "2", "--dp", "2", "--microbatches", "3"], "must divide the per-dp-rank batch"),
    (["--dp", "4", "--moe", "6"], r"--moe\(6\) experts must divide over --dp\(4\)"),
    (["--dp", "4", "--moe", "8", "--zero", "1"], "use --zero 0 or --zero 3"),
])
def test_command_line_rejects_bad_pipeline_and_moe_flags(monkeypatch, capsys, argv, match):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit):
        train_gpt.parse_args(argv)
    assert re.search(match, capsys.readouterr().err)
    assert train_gpt.parse_args(["--pp", "2", "--dp", "2", "--schedule", "zb_v"]).schedule == "zb_v"


def _main(argv):
    with dtp.comm_mode() as comm:
        result = train_gpt.main(argv)
    return result, dict(comm.fallbacks)


def test_main_zero1_dp2_tp2_sp_matches_one_process(tmp_path):
    argv = ["--dp", "2", "--tp", "2", "--sp", "--zero", "1", "--steps", "3", "--batch-size", "4",
            "--text-bytes", str(1 << 16), "--plot", str(tmp_path / "loss.png")]
    for result, fallbacks in run_on_ranks(4, _main, argv, timeout=120.0):
        assert not fallbacks, fallbacks
        assert len(result.mesh_losses) == 3
        losses, single = torch.tensor(result.mesh_losses), torch.tensor(result.single_losses)
        torch.testing.assert_close(losses, single, atol=1e-5, rtol=0)
        assert result.max_param_diff < 1e-5, result.max_param_diff


def test_a_wrong_flag_is_one_line_said_once(monkeypatch, capsys):
    """Under torchrun every rank parses: rank 0 says what is wrong in one line, the others say nothing."""
    for rank, expected_lines in (("0", 1), ("3", 0)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "4")
        with pytest.raises(SystemExit):
            train_gpt.parse_args(["--zero", "5"])
        err = capsys.readouterr().err
        assert len(err.splitlines()) == expected_lines, err
        assert expected_lines == 0 or ("invalid choice" in err and "(see --help)" in err)


def test_verdict_names_the_tolerance_and_why():
    equal = train_gpt.Result([1.0, 0.5], [1.0, 0.5 + 2e-7], 3e-7)
    assert train_gpt.verdict(equal, "float32").startswith("verdict: EQUAL to one device within 0.0001")
    assert "round in other orders" in train_gpt.verdict(equal, "float32")
    apart = train_gpt.Result([1.0], [1.01], 1e-3)
    assert "NOT EQUAL" in train_gpt.verdict(apart, "float32")
    flipped = train_gpt.Result([1.0], [1.01], 1e-3, routing_flips=(4, 1280))
    assert "4 MoE routing decisions flipped" in train_gpt.verdict(flipped, "float32")

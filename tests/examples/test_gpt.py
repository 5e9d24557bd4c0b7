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


@pytest.mark.parametrize("argv, match", [
    (["--pp", "2"], r"pp\(2\) \* dp\(1\) \* tp\(1\) \* cp\(1\) != world size\(4\)"),
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

"""A world far larger than this machine: rank 5 of 1024 (dp 128 x tp 8 with sp, ZeRO-3) of a GPT 4096 wide runs
its forward, backward and optimizer step on the meta device (a few seconds), and what it reports follows from
the layout."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import programs  # noqa: E402
from gpt import GPTConfig  # noqa: E402

from dtensor_plus.simulate import SimulationValueError, simulated_world  # noqa: E402

DP, TP = 128, 8
CONFIG = GPTConfig(vocab_size=32768, block_size=2048, num_layers=2, num_heads=32, dim=4096)


def _simulate_large():
    programs.LAYOUTS["dp128 x tp8+sp zero-3"] = (dict(dp=DP, tp=TP, sp=True, zero=3), {})
    try:
        return programs.simulated("dp128 x tp8+sp zero-3", DP * TP, 5, CONFIG, batch=DP)
    finally:
        del programs.LAYOUTS["dp128 x tp8+sp zero-3"]


F32, D, V, T, L = 4, CONFIG.dim, CONFIG.vocab_size, CONFIG.block_size, CONFIG.num_layers
BLOCK = 12 * D * D + 13 * D  # q, k, v, proj, fc, out weights and biases, two norms
WHOLE = L * BLOCK + 2 * V * D + T * D + 2 * D


def test_rank_of_a_1024_rank_world_of_a_4096_wide_gpt():
    step = _simulate_large()
    # every block's parameters are all-gathered on dp in forward and again in backward: 2 x (dp-1)/dp of the
    # tp shard, and the tp shard's gradients reduce-scattered once
    assert step.bytes("all_gather", "dp") == pytest.approx(2 * (DP - 1) / DP * F32 * WHOLE / TP, rel=0.1)
    assert step.bytes("reduce_scatter", "dp") == pytest.approx((DP - 1) / DP * F32 * WHOLE / TP, rel=0.1)
    assert step.count("all_gather", "tp") > 0 and step.count("reduce_scatter", "tp") > 0
    assert step.flops == sum(step.flops_by_module.values()) > 0  # its exact value: the last test
    assert {c.phase for c in step.collectives} == {"forward", "backward"}
    assert step.memory["activations"] > 0 and step.memory["optimizer"] > 0


# Found by the simulator: a ZeRO-3 shard was a view of its whole parameter, keeping the whole storage alive.
def test_zero3_rank_holds_only_its_share_of_the_parameters():
    step = _simulate_large()
    # tp splits all but the position embedding, the norms and the row-wise biases; ZeRO-3 splits everything on dp
    replicated_on_tp = T * D + L * 6 * D + 2 * D
    share = (WHOLE - replicated_on_tp) / (TP * DP) + replicated_on_tp / DP
    assert step.memory["parameters"] == pytest.approx(F32 * share, rel=0.02)  # chunk rounding: about 1% here


def test_a_value_read_in_a_simulated_world_names_the_problem():
    import torch

    with simulated_world(8, rank=3):
        x = torch.ones(4)
        with pytest.raises(SimulationValueError, match="shapes, not values"):
            x.sum().item()


def test_a_simulated_world_inside_a_real_one_is_refused():
    import torch.distributed as dist

    with simulated_world(2, rank=1):
        with pytest.raises(RuntimeError, match="already runs one"):
            with simulated_world(4, rank=0):
                pass
    assert not dist.is_initialized()


@pytest.mark.parametrize("world_size, rank", [(0, 0), (4, 4), (4, -1)])
def test_bad_world_or_rank(world_size, rank):
    with pytest.raises(ValueError, match="simulated_world needs"):
        with simulated_world(world_size, rank):
            pass


# The simulator's first version counted the dispatcher's shape propagation (each new plan runs the op once on meta
# tensors of the global shapes) as this rank's FLOPs: ZeRO-3 with tp+sp looked 1024x over its share here. Now the
# count is exactly this rank's share: its one sequence of T tokens through its 1/TP of every matmul, forward and
# backward (6 FLOPs per token and weight), and its 1/TP of the heads' attention (QK^T and AV: 4 T^2 D forward,
# twice that backward).
def test_zero3_tp_rank_computes_exactly_its_share():
    step = _simulate_large()
    matmul_weights = L * 12 * D * D + V * D  # the blocks' linears and the head (the embeddings are lookups)
    assert step.flops == (6 * T * matmul_weights + L * 12 * T * T * D) // TP

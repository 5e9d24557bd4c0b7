"""Issue 23: the MoE GPT of examples/train_gpt.py trains with load balancing on (examples/moe_balancing.py)
and equals one device, while the imbalance figure (max / mean tokens per ep rank) falls.

The router is skewed on purpose (``--moe-skew``: experts 0 and 1, both on ep rank 0, get a logit bonus of
about 3), so at step 0 every token goes to rank 0's experts: the figure is ep (2 on 2 ranks, 4 on 4).
Re-placing (``place``: FlexMoE / SmartMoE, every 2 steps) puts the two hot experts on two ranks, the best a
placement can do while they take everything (1.0 on 2 ranks, 2.0 on 4); the DeepSeek-V3 bias (``bias``,
a sign step per training step) pulls tokens towards the cold experts, overshooting at a high rate. Without
balancing the figure stays at ep. By default: both mechanisms at once on 2 ranks; the modes alone on 2 and
4 ranks under ``slow``. Every run equals one process doing the
same steps (the single run moves its bias the same way; re-placement changes no arithmetic): losses, every
parameter (expert rows read back in expert-id order) and every routing decision.

float64, so that no top-k decision flips on last-bit differences (see tests/examples/test_gpt_moe.py) and the
equality is to 1e-10. Seeded data and weights: the figures are deterministic.
"""

import sys
from pathlib import Path

import pytest
import torch

from dtensor_plus.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import train_gpt  # noqa: E402
from gpt import GPT, PRESETS  # noqa: E402
from gpt_layouts import Layout  # noqa: E402
from moe_balancing import MoEBalancing, experts_in_id_order, rank_imbalance, skew_router  # noqa: E402

CONFIG = PRESETS["debug"].replace(moe_experts=8, moe_top_k=2, dropout=0.1)
STEPS, BATCH, SKEW = 6, 8, 3.0


def _batches():
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, CONFIG.vocab_size, (4096,), generator=g)
    return list(train_gpt.batches(data, STEPS, BATCH, CONFIG.block_size, seed=0))


def _train_modes(modes, rate):
    """Each mode trained on a dp = ep = world mesh against one process: (losses diff, param diff, flips,
    imbalance per step) per mode."""
    out = {}
    for mode in modes:
        balancing = MoEBalancing(mode, every=2, rate=rate, skew=SKEW)
        result = train_gpt.compare_with_single(CONFIG, Layout(dp=torch.distributed.get_world_size()), _batches(),
                                               lr=1e-2, balancing=balancing, dtype=torch.float64)
        loss_diff = max(abs(a - b) for a, b in zip(result.mesh_losses, result.single_losses))
        out[mode] = (loss_diff, result.max_param_diff, result.routing_flips, result.imbalance)
    return out


def _check(results, world):
    by_mode = results[0]
    assert all(r == by_mode for r in results), "every rank sees the same losses and figures"
    for mode, (loss_diff, param_diff, (flips, total), figure) in by_mode.items():
        assert loss_diff < 1e-10 and param_diff < 1e-10, (mode, loss_diff, param_diff)
        assert flips == 0 and total > 0, (mode, flips, total)
        assert len(figure) == STEPS
        assert figure[0] == pytest.approx(world), (mode, figure)  # the skew sends every token to rank 0
    if "none" in by_mode:
        assert by_mode["none"][3] == [pytest.approx(world)] * STEPS  # unbalanced, it stays skewed
    if "place" in by_mode:  # from the first re-plan (after step 1) on: the two hot experts on two ranks,
        figure = by_mode["place"][3]  # the best a placement can do while they take every token
        assert figure[2:] == [pytest.approx(world / 2)] * (STEPS - 2), figure
    if "both" in by_mode:  # the same, give or take the few tokens the bias has moved to cold experts by then
        figure = by_mode["both"][3]
        assert max(figure[2:]) <= 1.1 * world / 2 and figure[-1] <= world / 2, figure
    if "bias" in by_mode:  # the sign-step bias pulls tokens off the hot experts, overshooting at a high rate
        figure = by_mode["bias"][3]
        assert sum(figure[1:]) / (STEPS - 1) < 0.8 * world, figure


def test_moe_gpt_trains_with_balancing_equal_to_one_device_and_the_imbalance_falls():
    _check(run_on_ranks(2, _train_modes, ("both",), 0.1, timeout=180), world=2)


# A high bias rate overshoots (the sign step moves the whole batch's routing at once): with re-placement on
# too, it fights the placement (rate 0.5 on 2 ranks: 2.0, 1.17, 1.0, 2.0, 1.94, 1.08), so "both" runs at 0.1.
@pytest.mark.slow
@pytest.mark.parametrize("world, modes, rate", [(2, ("none", "place", "bias"), 0.5),
                                                (4, ("none", "place", "bias"), 0.5), (4, ("both",), 0.1)])
def test_each_balancing_mode(world, modes, rate):
    _check(run_on_ranks(world, _train_modes, modes, rate, timeout=300), world=world)


def test_skew_and_figures_on_one_process():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    skew_router(model, SKEW)
    model.loss(*_batches()[0])
    load = model.moe_layers()[0].load
    assert load[:2].sum() == load.sum(), load  # every assignment to experts 0 and 1
    assert rank_imbalance(model) == 1.0  # no ep mesh dim: one rank holds every expert
    assert "ep max/mean 1.00" in model.moe_load_line()
    w1 = model.blocks[1].mlp.moe.experts.w1
    model.blocks[1].mlp.moe.expert_slot.copy_(torch.tensor([7, 6, 5, 4, 3, 2, 1, 0]))
    assert torch.equal(experts_in_id_order(model, "blocks.1.mlp.moe.experts.w1", w1.flip(0)), w1)
    with pytest.raises(ValueError, match="MoE balancing needs an MoE model"):
        train_gpt.compare_with_single(PRESETS["debug"], Layout(), [], balancing=MoEBalancing("bias"))


@pytest.mark.parametrize("argv, match", [
    (["--moe-balance", "bias"], "give --moe E"),
    (["--moe", "8", "--moe-balance", "place", "--zero", "3"], "--zero 0"),
    (["--moe", "8", "--moe-balance", "both", "--moe-balance-every", "0"], "every must be >= 1"),
    (["--moe", "8", "--moe-balance", "bias", "--moe-balance-rate", "0"], "rate must be > 0"),
])
def test_bad_balancing_flags_are_refused(argv, match, capsys):
    with pytest.raises(SystemExit):
        train_gpt.parse_args(argv)
    assert match in capsys.readouterr().err

"""Load balancing of mixture-of-experts: by placement (FlexMoE / SmartMoE: hot experts re-placed across ep ranks,
weights, gradients and AdamW state moved with them), by DeepSeek-V3's auxiliary-loss-free routing bias, with
DeepSeek-V3's shared experts; training with all of it on equals one device, and the busiest rank gets lighter.

Legend: B batch, T sequence, D width, F expert hidden width, E experts, L experts per ep rank.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import Replicate, Shard
from dtensor_plus.layouts.data import replicate
from dtensor_plus.layouts.moe import MoE, expert_parallel
from dtensor_plus.layouts.moe_balance import (
    PlacementCost,
    balanced_slots,
    expert_moving_bytes,
    experts_to_shadow,
    imbalance,
    moved_experts,
    rank_load,
    token_moving_bytes,
)
from dtensor_plus.layouts.moe_placement import ExpertRebalancer, place_experts
from dtensor_plus.testing import run_on_ranks

T, D, F_HIDDEN, E = 3, 6, 8, 8
HOT = [0, 1]  # both on ep rank 0 at the start (E / ep = 2 experts per rank on 4 ranks)


# -- the planner and the cost model (plain numbers) ---------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(ep=st.sampled_from([1, 2, 4]), per_rank=st.integers(1, 3), data=st.data())
def test_balanced_slots_is_a_placement_that_never_makes_the_busiest_rank_busier(ep, per_rank, data):
    num_experts = ep * per_rank
    load_E = torch.tensor(data.draw(st.lists(st.integers(0, 50), min_size=num_experts, max_size=num_experts)))
    old = torch.tensor(data.draw(st.permutations(list(range(num_experts)))))
    new = balanced_slots(load_E, old, ep)
    assert sorted(new.tolist()) == list(range(num_experts))
    assert rank_load(load_E, new, ep).max() <= rank_load(load_E, old, ep).max()
    stayed = old // per_rank == new // per_rank
    assert torch.equal(new[stayed], old[stayed]), "an expert that stays on its rank keeps its row"
    assert rank_load(load_E, new, ep).sum() == load_E.sum()


def test_balanced_slots_spreads_two_hot_experts_and_moves_few():
    load = torch.tensor([40, 40, 1, 1, 1, 1, 1, 1])
    old = torch.arange(E)
    assert imbalance(load, old, 4) == pytest.approx(80 / 21.5)
    new = balanced_slots(load, old, 4)
    assert imbalance(load, new, 4) == pytest.approx(41 / 21.5)
    assert moved_experts(old, new, 4) == 2  # one hot expert leaves rank 0 and one cold expert comes back
    with pytest.raises(ValueError, match="its own row"):
        balanced_slots(load, torch.zeros(E, dtype=torch.long), 4)


def test_cost_model_moves_only_when_the_saving_over_the_horizon_beats_the_move():
    load, old = torch.tensor([40, 40, 1, 1, 1, 1, 1, 1]), torch.arange(E)
    new = balanced_slots(load, old, 4)
    cost = PlacementCost(seconds_per_assignment=1e-3, expert_bytes=1e6, bytes_per_second=1e8, horizon_steps=1)
    assert cost.saving_seconds(load, old, new, 4) == pytest.approx((80 - 41) * 1e-3)  # busiest rank 80 -> 41
    assert cost.moving_seconds(old, new, 4) == pytest.approx(2 * 1e-2)
    assert cost.pays(load, old, new, 4)
    assert not PlacementCost(1e-3, 1e7, 1e8, 1).pays(load, old, new, 4)  # 0.2 s to move, 0.039 s saved


def test_janus_bytes_by_the_formula():
    # a token moves 4 times (dispatch, combine, and both again in backward) to (ep-1)/ep of the ranks
    assert token_moving_bytes(1024, 2, 512, 4) == 4 * 1024 * 2 * 512 * 4 * 3 / 4
    # an expert's weights go to ep-1 ranks and its gradient comes back from them
    assert expert_moving_bytes(2, 2 * 512 * 2048, 4) == 2 * 3 * 2 * 2 * 512 * 2048 * 4


def test_experts_to_shadow_are_those_whose_tokens_move_more_bytes_than_they_do():
    # ep 4, D 8, an expert of 1000 parameters: shadow when 4 load 3/4 8 > 2 3 1000, i.e. load > 250
    assert experts_to_shadow(torch.tensor([300, 251, 250, 10]), 8, 1000, 4) == (0, 1)
    assert experts_to_shadow(torch.tensor([300, 251, 250, 10]), 8, 1000, 1) == ()


def test_balancing_bias_picks_experts_but_the_gates_stay_unbiased():
    torch.manual_seed(0)
    moe = MoE(D, F_HIDDEN, E, top_k=1, balance_rate=0.5)
    x = torch.randn(2, T, D)
    moe.router.balance_bias[5] = 10.0  # beats any probability: every token picks expert 5
    routing = moe.router(x)
    assert routing.expert_idx_NK.unique().tolist() == [5]
    probs = moe.router.gate(x.reshape(-1, D)).softmax(-1)
    torch.testing.assert_close(routing.gates_NK, probs[:, 5:6])
    moe(x)
    moe.update_balance_bias()  # expert 5 over the mean: down by the rate; all the others under it: up
    assert moe.router.balance_bias.tolist() == [0.5] * 5 + [9.5] + [0.5] * 2
    with pytest.raises(ValueError, match="balance_rate"):
        MoE(D, F_HIDDEN, E).router.update_balance_bias(routing.chosen_E)


# -- training on ranks against one device ----------------------------------------------------------------------


class Skewed(nn.Module):
    """MoE (with shared experts and the balancing bias) -> Linear, whose router favours experts 0 and 1."""

    def __init__(self):
        super().__init__()
        self.moe = MoE(D, F_HIDDEN, E, top_k=2, aux_loss_coef=0.01, balance_rate=0.01, shared_hidden=5)
        self.out = nn.Linear(D, D)
        with torch.no_grad():  # inputs have mean ~1 (see _data): a logit of about +3 for the hot experts
            self.moe.router.gate.weight[HOT] += 3.0 / D

    def forward(self, x):
        return self.out(self.moe(x))


def _data(batch, step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(batch, T, D, generator=g) + 1.0, torch.randn(batch, T, D, generator=g)


def _mesh_and_place(layout, net):
    """"ep": 1-D mesh, ep = the data-parallel dim; "dp-ep": (dp 2, ep 2), experts replicated over dp; "ep-tp":
    (ep 2, tp 2), tp inside experts."""
    world = torch.distributed.get_world_size()
    if layout == "ep":
        mesh = dtp.init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        return mesh, expert_parallel(replicate(net, mesh, "ep"), mesh, ep_mesh_dim="ep"), [Shard(0)]
    if layout == "dp-ep":
        mesh = dtp.init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "ep"))
        return mesh, expert_parallel(replicate(net, mesh, "dp"), mesh, ep_mesh_dim="ep"), [Shard(0), Shard(0)]
    mesh = dtp.init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("ep", "tp"))
    net = expert_parallel(replicate(net, mesh, "ep"), mesh, ep_mesh_dim="ep", tp_mesh_dim="tp")
    return mesh, net, [Shard(0), Replicate()]


def _check_balanced_training(layout, shadowed=(0,), steps=6, every=2, batch=7):
    """``steps`` AdamW steps of the skewed net on ranks, re-placing experts every ``every`` steps, updating the
    balancing bias every step and shadowing the experts ``shadowed`` (FasterMoE), against one device doing the
    same steps with no placement at all: equal losses, input gradients, parameters and optimizer state (the
    experts read back in expert order). Returns this rank's (bytes sent re-placing, history)."""
    torch.manual_seed(0)
    single = Skewed()
    mesh, net, rows = _mesh_and_place(layout, copy.deepcopy(single))
    net.moe.shadowed = shadowed
    opt, single_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False) for m in (net, single))
    rebalancer = ExpertRebalancer(net, opt, every=every)
    moved_bytes = 0
    for step in range(steps):
        x_whole, y_whole = _data(batch, step)
        x_whole.requires_grad_()
        x = dtp.distribute_tensor(x_whole.detach(), mesh, rows, src_data_rank=None).requires_grad_()
        y = dtp.distribute_tensor(y_whole, mesh, rows, src_data_rank=None)
        with dtp.comm_mode() as comm:
            loss = F.mse_loss(net(x), y) + net.moe.aux_loss
            loss.backward()
        # each shadow: its w1 and w2 broadcast from the owner, their gradients reduced onto it
        assert comm.count("broadcast") == comm.count("reduce") == 2 * len(shadowed), comm
        want = F.mse_loss(single(x_whole), y_whole) + single.moe.aux_loss
        want.backward()
        torch.testing.assert_close(loss.full_tensor(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad.full_tensor(), x_whole.grad, atol=1e-5, rtol=1e-5)
        for o, m in ((opt, net), (single_opt, single)):
            o.step()
            o.zero_grad()
            m.moe.update_balance_bias()
        with dtp.comm_mode() as comm:
            rebalancer.step()
        moved_bytes += comm.bytes("all_to_all")
    slot = net.moe.expert_slot.full_tensor()
    assert not torch.equal(slot, torch.arange(E)), "the skewed load made the rebalancer move experts"
    params = dict(single.named_parameters())
    for name, p in net.named_parameters():
        got = p.full_tensor()[slot] if name.startswith("moe.experts.") else p.full_tensor()
        torch.testing.assert_close(got, params[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt.state[p][key].full_tensor()
            state = state[slot] if name.startswith("moe.experts.") else state
            torch.testing.assert_close(state, single_opt.state[params[name]][key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net.moe.router.balance_bias.full_tensor(), single.moe.router.balance_bias)
    return moved_bytes, rebalancer.history


@pytest.mark.parametrize("layout, shadowed", [("ep", (0,)), pytest.param("ep", (), marks=pytest.mark.slow),
                                              pytest.param("dp-ep", (1, 0), marks=pytest.mark.slow),
                                              pytest.param("ep-tp", (0,), marks=pytest.mark.slow)])
def test_rebalanced_training_with_shadows_bias_and_shared_experts_equals_one_device(layout, shadowed):
    results = run_on_ranks(4, _check_balanced_training, layout, shadowed, timeout=120)
    history = results[0][1]
    assert all(h == results[0][1] for _, h in results), "every rank plans the same placement"
    before, after, moved = history[0][0]
    assert moved and after < before, history
    # exact bytes: each expert that changed rank sent its w1 and w2 blocks, each with its two AdamW moments
    # (gradients are None after zero_grad), once per dp row; tp ranks send their halves
    dp_rows = 2 if layout == "dp-ep" else 1
    assert sum(b for b, _ in results) == sum(m for (_, _, m), in history) * 3 * 2 * D * F_HIDDEN * 4 * dp_rows


def _check_place_bytes():
    mesh = dtp.init_device_mesh("cpu", (4,), mesh_dim_names=("ep",))
    torch.manual_seed(0)
    moe = expert_parallel(replicate(MoE(D, F_HIDDEN, E), mesh, "ep"), mesh, ep_mesh_dim="ep")
    before = [w.full_tensor() for w in (moe.experts.w1, moe.experts.w2)]
    new = torch.tensor([7, 1, 2, 3, 4, 5, 6, 0])  # experts 0 and 7 swap ranks 0 and 3
    with dtp.comm_mode() as comm:
        place_experts(moe, new)
    for w, whole in zip((moe.experts.w1, moe.experts.w2), before):
        assert torch.equal(w.full_tensor()[new], whole)
    with pytest.raises(ValueError, match="its own row"):
        place_experts(moe, torch.zeros(E, dtype=torch.long))
    return comm.bytes("all_to_all")


def test_place_experts_sends_exactly_the_experts_that_change_rank():
    sent = run_on_ranks(4, _check_place_bytes)
    one_expert = 2 * D * F_HIDDEN * 4  # its w1 and w2 block, fp32
    assert sent == [one_expert, 0, 0, one_expert]

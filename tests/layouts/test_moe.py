"""Mixture-of-experts with expert parallelism: forward, backward and training equal the single-device MoE
(the whole batch through the same layer, all experts on one process), in dropless and capacity mode, for ep
on its own, ep carved out of a data-parallel dim with ZeRO-3 on the same ranks, and tp inside experts.

Legend: B batch, T sequence, D width, F expert hidden width, E experts, K top-k.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate, Shard
from dtensor_plus.layouts.data import replicate
from dtensor_plus.layouts.moe import MoE, expert_parallel
from dtensor_plus.layouts.moe_router import capacity_keep, stable_topk
from dtensor_plus.layouts.zero import fully_shard
from dtensor_plus.testing import run_on_ranks

T, D, F_HIDDEN = 3, 8, 12


class Net(nn.Module):
    """Linear -> MoE -> Linear, with the MoE's auxiliary losses in the loss."""

    def __init__(self, num_experts, top_k, capacity_factor=None, jitter=0.0):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = MoE(D, F_HIDDEN, num_experts, top_k, capacity_factor=capacity_factor, jitter=jitter,
                       aux_loss_coef=0.1, z_loss_coef=0.01)
        self.out = nn.Linear(D, D)

    def forward(self, x_BTD):
        return self.out(self.moe(self.inp(x_BTD)))

    def loss(self, x_BTD, y_BTD):
        return F.mse_loss(self(x_BTD), y_BTD) + self.moe.aux_loss


def _net(num_experts, top_k, capacity_factor=None, jitter=0.0, seed=0):
    torch.manual_seed(seed)
    return Net(num_experts, top_k, capacity_factor, jitter)


def _data(batch, step=0):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(batch, T, D, generator=g), torch.randn(batch, T, D, generator=g)


# -- one device: the oracle itself --------------------------------------------------------------------------


def _dense_moe(moe, x_BTD):
    """Every token through its top-k experts one at a time: the definition the grouped path must equal."""
    x_ND = x_BTD.reshape(-1, D)
    probs_NE = moe.router.gate(x_ND).softmax(-1)
    top_NK, idx_NK = stable_topk(probs_NE, moe.router.top_k)
    gates_NK = top_NK / top_NK.sum(-1, keepdim=True) if moe.router.top_k > 1 else top_NK
    w1, w2 = moe.experts.w1, moe.experts.w2
    rows = [sum(g * (F.gelu(x @ w1[e]) @ w2[e]) for g, e in zip(gs, es)) for x, gs, es in zip(x_ND, gates_NK, idx_NK)]
    return torch.stack(rows).view(x_BTD.shape)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_single_device_moe_equals_per_token_loop(top_k):
    net = _net(4, top_k)
    x, _ = _data(5)
    torch.testing.assert_close(net.moe(x), _dense_moe(net.moe, x), atol=1e-6, rtol=1e-5)
    # Load-balancing loss: E sum_e f_e P_e is 1 for a uniform router.
    net.moe.router.gate.weight.data.zero_()
    net.moe(x)
    torch.testing.assert_close(net.moe.routing.aux_loss, torch.tensor(1.0))


def test_ties_go_to_the_lowest_expert_and_capacity_keeps_earliest():
    values, idx = stable_topk(torch.tensor([[0.2, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]]), 2)
    assert idx.tolist() == [[1, 2], [0, 1]]
    # 4 tokens, top-2, all to experts (0, 1): capacity 3 keeps tokens 0-2 in slot 0, none in slot 1 for expert 1?
    # Slot-major order: expert 0 takes tokens 0, 1, 2 (first choices); expert 1 takes tokens 0, 1, 2 (second).
    keep = capacity_keep(torch.tensor([[0, 1]] * 4), 4, 3)
    assert keep.tolist() == [[True, True]] * 3 + [[False, False]]
    # First choices beat second choices: token 1's first choice (1) fills expert 1 before token 0's second.
    keep = capacity_keep(torch.tensor([[0, 1], [1, 0]]), 2, 1)
    assert keep.tolist() == [[True, False], [True, False]]


# -- expert parallelism on ranks ----------------------------------------------------------------------------


def _place(net, mesh, layout):
    """``layout``: "ep" (1-D mesh, ep = the data-parallel dim), "zero3" (the same, ZeRO-3 on the non-expert
    modules), "tp" (mesh (ep, tp), tp inside experts), "replicated" (no ep: every rank holds all experts),
    "dp-ep" (mesh (dp, ep), the batch split on both, experts replicated over dp)."""
    if layout == "replicated":
        return replicate(net, mesh, "dp")
    if layout == "dp-ep":
        return expert_parallel(replicate(net, mesh, "dp"), mesh, ep_mesh_dim="ep")
    if layout == "zero3":
        expert_parallel(net, mesh, ep_mesh_dim="dp")
        for module in (net.inp, net.moe.router, net.out):
            fully_shard(module, mesh)
        return net
    dp = mesh.mesh_dim_names[0]
    replicate(net, mesh, dp)
    return expert_parallel(net, mesh, ep_mesh_dim=dp, tp_mesh_dim="tp" if layout.startswith("tp") else None)


def _mesh(layout):
    world = torch.distributed.get_world_size()
    if layout.startswith("tp"):
        return dtp.init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("ep", "tp"))
    if layout == "dp-ep":
        return dtp.init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "ep"))
    return dtp.init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))


def _shard(t, mesh, layout=""):
    """The batch Shard(0) on the first mesh dim; "tp-sp": the sequence Shard(1) on tp too (the MoE gathers it
    for routing and hands its output back sequence-sharded)."""
    rest = [{"tp-sp": Shard(1), "dp-ep": Shard(0)}.get(layout, Replicate())] * (mesh.ndim - 1)
    return dtp.distribute_tensor(t, mesh, [Shard(0)] + rest, src_data_rank=None)


def _check_forward_backward(layout, batch, num_experts, top_k, capacity_factor, zero_router=False):
    """One forward and backward on the mesh against one device: outputs, losses, every gradient, the load."""
    mesh = _mesh(layout)
    single = _net(num_experts, top_k, capacity_factor)
    if zero_router:  # every logit ties: routing by tie-breaking alone, capacity dropping the same tokens
        single.moe.router.gate.weight.data.zero_()
    net = _place(copy.deepcopy(single), mesh, layout)
    x, y = _data(batch)
    with dtp.comm_mode() as comm:
        loss = net.loss(_shard(x, mesh, layout), _shard(y, mesh, layout))
        loss.backward()
    want = single.loss(x, y)
    want.backward()
    torch.testing.assert_close(loss.full_tensor(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net.moe.load, single.moe.load)
    if capacity_factor is not None:  # this rank's rows of one device's keep mask: the same tokens drop
        keep = single.moe.routing.keep_NK.view(batch, T, -1)
        want_keep = dtp.distribute_tensor(keep, mesh, net.moe.routing.row_placements, src_data_rank=None)
        assert torch.equal(net.moe.routing.keep_NK, want_keep.to_local().reshape(-1, keep.shape[-1]))
    grads = dict(single.named_parameters())
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), grads[name].grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    expert_params = [net.moe.experts.w1, net.moe.experts.w2]
    ep_mesh_dim = 1 if layout == "dp-ep" else 0
    assert all(p.placements[ep_mesh_dim] == (Replicate() if layout == "replicated" else Shard(0)) for p in expert_params)
    if layout.startswith("tp"):
        assert net.moe.experts.w1.placements[1] == Shard(2) and net.moe.experts.w2.placements[1] == Shard(1)
    # forward: counts, rows out, rows back; backward: the two row all-to-alls inverted
    assert comm.count("all_to_all") == (0 if layout == "replicated" else 5) and not comm.fallbacks, comm
    return net.moe.load


@settings(max_examples=4)
@given(
    world=st.sampled_from([2, 4]),
    batch=st.integers(1, 7),
    top_k=st.sampled_from([1, 2]),
    capacity_factor=st.sampled_from([None, None, 0.5, 1.0]),
)
def test_forward_backward_equal_single_device(world, batch, top_k, capacity_factor):
    # Uneven batch shards (torch.chunk), empty ones too: ranks send and receive different numbers of tokens.
    run_on_ranks(world, _check_forward_backward, "ep", batch, 8, top_k, capacity_factor)


@pytest.mark.parametrize("layout", ["ep", "replicated"])
def test_capacity_drops_the_same_tokens_as_one_device_under_ties(layout):
    # All logits equal: every token picks experts (0, 1); capacity ceil(1.0 * 18 * 2 / 4) = 9 keeps the first
    # 9 tokens in both slots, on every layout.
    load = run_on_ranks(2, _check_forward_backward, layout, 6, 4, 2, 1.0, True)[0]
    assert load.tolist() == [9, 9, 0, 0]


@pytest.mark.parametrize("layout", ["tp", "tp-sp", "dp-ep"])
def test_two_dim_meshes(layout):
    """tp inside experts (tokens replicated or sequence-sharded on tp); ep inside dp (experts replicated on dp,
    their gradients reduced there)."""
    run_on_ranks(4, _check_forward_backward, layout, 5, 4, 2, 1.0)


def test_ep_with_zero3_on_the_same_ranks():
    run_on_ranks(4, _check_forward_backward, "zero3", 6, 8, 2, None)


def _train(net, steps, batch, place=lambda t: t):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    losses = []
    for step in range(steps):
        x, y = _data(batch, step)
        loss = net.loss(place(x), place(y))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.full_tensor().item() if isinstance(loss, DTensor) else loss.item())
    return losses


def _check_training(layout, batch, num_experts, top_k, jitter=0.0, steps=20):
    """``steps`` AdamW steps on the mesh and on one device: equal losses and final parameters (fp32, 1e-5).
    Jitter noise is drawn as one device draws it (strict RNG)."""
    mesh = _mesh(layout)
    single = _net(num_experts, top_k, jitter=jitter)
    net = _place(copy.deepcopy(single), mesh, layout)
    dtp.manual_seed(7, strict=True)
    losses = _train(net, steps, batch, lambda t: _shard(t, mesh))
    torch.manual_seed(7)
    want = _train(single, steps, batch)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), atol=1e-5, rtol=1e-5)
    params = dict(single.named_parameters())
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.full_tensor(), params[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("world, layout, top_k, jitter", [
    (2, "ep", 1, 0.05),   # top-1 with jitter noise
    (4, "zero3", 2, 0.0),  # ep = dp = 4, ZeRO-3 on the same ranks
    (4, "tp", 2, 0.0),     # ep 2 x tp 2 inside experts
    (8, "ep", 2, 0.0),     # ep 8: one expert per rank
])
def test_twenty_training_steps_equal_single_device(world, layout, top_k, jitter):
    run_on_ranks(world, _check_training, layout, 2 * world, 8, top_k, jitter)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="top_k"):
        MoE(D, F_HIDDEN, 4, top_k=5)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(D, F_HIDDEN, 4, capacity_factor=0.0)
    net = _net(4, 2)
    run_on_ranks(2, _check_errors, net)


def _check_errors(net):
    mesh = _mesh("ep")
    with pytest.raises(ValueError, match="3 experts do not divide over 2 ranks"):
        expert_parallel(MoE(D, F_HIDDEN, 3, 2), mesh, ep_mesh_dim="dp")
    with pytest.raises(ValueError, match="no mesh dim 'ep'"):
        expert_parallel(net, mesh)
    with pytest.raises(TypeError, match="both be DTensors"):
        net.moe(_shard(_data(2)[0], mesh))

"""Tutel's ep/dp switch (``MoE.expert_mode``): one expert layout, Shard(0) on ep, from which a step runs
expert-parallel (tokens all-to-all) or data-parallel over experts (weights all-gathered for the step, gradients
reduce-scattered onto the owners). Training that switches mode from step to step equals one device; the
weights and the optimizer state never move (the same local blocks, the same storage); each mode moves exactly
its formula's bytes; "auto" picks the mode the byte comparison names.

Legend: E experts, L experts per rank, P elements of one expert, D width, F expert hidden width.
"""

import copy

import pytest
import torch

import dtensor_plus as dtp
from dtensor_plus import Shard
from dtensor_plus.layouts.data import replicate
from dtensor_plus.layouts.moe import MoE, expert_parallel
from dtensor_plus.layouts.moe_balance import rank_load, token_moving_bytes
from dtensor_plus.layouts.moe_switch import choose_mode, token_bytes
from dtensor_plus.testing import run_on_ranks
from test_moe_dropless import D, F_HIDDEN  # noqa: E402  (tests/layouts is on sys.path under pytest's rootdir)

EP, E = 4, 8


def _check_switching(modes):
    mesh = dtp.init_device_mesh("cpu", (EP,), mesh_dim_names=("ep",))
    torch.manual_seed(0)
    single = MoE(D, F_HIDDEN, E, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01)
    single.router.gate.weight.data[:, :2] *= 20  # skewed: most tokens to a few experts
    net = expert_parallel(replicate(copy.deepcopy(single), mesh, "ep"), mesh, ep_mesh_dim="ep")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False) for m in (net, single)]
    blocks = [p._local_tensor for p in (net.experts.w1, net.experts.w2)]
    storage = [b.untyped_storage().data_ptr() for b in blocks]
    L, P = E // EP, 2 * D * F_HIDDEN
    ran = []
    for step, mode in enumerate(modes):
        net.expert_mode = mode
        g = torch.Generator().manual_seed(step)
        x_whole = torch.randn(7, 3, D, generator=g).requires_grad_()  # 7 rows over 4 ranks: uneven shards
        x = dtp.distribute_tensor(x_whole.detach(), mesh, [Shard(0)], src_data_rank=None).requires_grad_()
        seed = torch.randn(7, 3, D, generator=g)
        with dtp.comm_mode() as forward:
            y = net(x)
        with dtp.comm_mode() as backward:
            ((y * dtp.distribute_tensor(seed, mesh, [Shard(0)], src_data_rank=None)).sum() + net.aux_loss).backward()
        ((single(x_whole) * seed).sum() + single.aux_loss).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        ran.append(net.mode)
        if mode == "auto":  # the byte comparison, written out: experts 2 (ep-1) L P, tokens 2 (T + max load (ep-2)) / ep D
            busiest = rank_load(net.load, net.expert_slot.to_local(), EP).max().item()
            tokens = 2 * (net.load.sum().item() + busiest * (EP - 2)) / EP * D
            assert net.mode == ("dp" if 2 * (EP - 1) * L * P < tokens else "ep")
        if net.mode == "dp":  # the weights all-gathered (w1, w2), their gradients reduce-scattered; no token moves
            assert forward.bytes("all_gather", "ep") == (EP - 1) * L * P * 4 and forward.count("all_to_all") == 0, forward
            assert backward.bytes("reduce_scatter", "ep") == (EP - 1) * L * P * 4, backward
            assert backward.count("all_to_all") == 0, backward
        else:  # counts, rows out, rows back; nothing gathered
            assert forward.count("all_to_all") == 3 and forward.count("all_gather") == 0, forward
        torch.testing.assert_close(net.load, single.load)
        torch.testing.assert_close(x.grad.full_tensor(), x_whole.grad, atol=1e-5, rtol=1e-5)
        # the weights never moved: the same local blocks, in the same storage, Shard(0) on ep
        assert [p._local_tensor for p in (net.experts.w1, net.experts.w2)] == blocks
        assert [b.untyped_storage().data_ptr() for b in blocks] == storage
        assert net.experts.w1.placements == (Shard(0),)
        state = opts[0].state[net.experts.w1]
        assert state["exp_avg"].placements == (Shard(0),) and state["exp_avg"].to_local().shape[0] == L
    params = dict(single.named_parameters())
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.full_tensor(), params[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    return ran


@pytest.mark.parametrize("modes", [("ep", "dp", "auto"),
                                   pytest.param(("dp", "ep", "dp"), marks=pytest.mark.slow)])
def test_switching_between_ep_and_dp_trains_as_one_device_and_moves_no_weight(modes):
    ran = run_on_ranks(EP, _check_switching, modes)[0]
    assert ran[:2] == list(modes[:2])


def test_choose_mode_by_the_byte_formula():
    slot = torch.arange(8)
    even, skewed = torch.full((8,), 16), torch.tensor([120, 0, 0, 0, 0, 0, 0, 8])
    # ep 4, L 2, D 64, 4 B: experts move 2*3*2*P*4 = 48 P bytes; the busiest rank's tokens 2 (128 + 2 load) / 4 * 256
    assert token_bytes(even, slot, 4, 64) == 24_576 == token_moving_bytes(32, 1, 64, 4)  # even: Janus's formula
    assert token_bytes(skewed, slot, 4, 64) == 47_104  # rank 0 takes 120 of the 128 assignments
    assert choose_mode(even, slot, 4, 64, 500) == "dp"   # 24 000 < 24 576
    assert choose_mode(even, slot, 4, 64, 512) == "ep"   # a tie (24 576 each) keeps the weights' own layout
    assert choose_mode(skewed, slot, 4, 64, 960) == "dp"  # 46 080 < 47 104: the tokens piled on rank 0
    assert choose_mode(even, slot, 4, 64, 960) == "ep"  # the same experts against the same tokens spread evenly
    assert choose_mode(even, slot, 1, 64, 1) == "ep"

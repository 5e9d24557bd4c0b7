"""Dropless experts (MegaBlocks, ScatterMoE): with ``capacity_factor=None`` no assignment is dropped, each expert
computes a grouped product over however many rows it got (none included), and the result equals one device for
any routing: outputs, the input's gradient, the gates' gradient and the experts' weight gradients.

Two levels: ``dispatch_combine`` under arbitrary routings drawn by hypothesis (every token to one expert, empty
ranks, experts and whole ep ranks with no row), and the whole ``MoE`` layer under the most skewed routing a
router makes (a zero gate: every token to experts 0 and 1, one ep rank does all the work) for a few AdamW steps.
The pipelined dispatch's backward overlaps: its order of issues, waits and expert backward is checked exactly.

Legend: N tokens, D width, F expert hidden width, E experts, L experts per rank, K top-k.
"""

import copy

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Shard
from dtensor_plus.layouts import moe_pipelined
from dtensor_plus.layouts.data import replicate
from dtensor_plus.layouts.moe import GroupedExperts, MoE, expert_parallel
from dtensor_plus.layouts.moe_dispatch import dispatch_combine
from dtensor_plus.testing import run_on_ranks

D, F_HIDDEN = 4, 6


def _dense(x_ND, idx_NK, gates_NK, w1, w2):
    """The definition: every token through each of its experts, one at a time, weighted by its gate."""
    rows = [sum((g * (F.gelu(x @ w1[e]) @ w2[e]) for g, e in zip(gs, es)), torch.zeros(D))
            for x, gs, es in zip(x_ND, gates_NK, idx_NK)]
    if not rows:  # no token in the whole batch: every gradient is zero (a graph that reaches each input)
        return x_ND.new_zeros(0, D) * (x_ND.sum() + gates_NK.sum() + w1.sum() + w2.sum())
    return torch.stack(rows)


def _check_routing(tokens_per_rank, idx_NK, num_experts, top_k, chunks=1):
    """This rank's tokens dispatched to experts sharded over all ranks equal the dense definition on the whole
    batch: y, dy/dx, dy/dgates and the gradients of this rank's expert weights (from every rank's tokens)."""
    world, me = torch.distributed.get_world_size(), torch.distributed.get_rank()
    mesh = dtp.init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    L = num_experts // world
    g = torch.Generator().manual_seed(len(idx_NK))
    x_all = torch.randn(len(idx_NK), D, generator=g)
    gates_all = torch.rand(len(idx_NK), top_k, generator=g)
    w1_all, w2_all = torch.randn(num_experts, D, F_HIDDEN, generator=g), torch.randn(num_experts, F_HIDDEN, D, generator=g)
    idx_all = torch.tensor(idx_NK, dtype=torch.int64).reshape(len(idx_NK), top_k)

    start = sum(tokens_per_rank[:me])
    mine = slice(start, start + tokens_per_rank[me])
    x, gates = x_all[mine].clone().requires_grad_(), gates_all[mine].clone().requires_grad_()
    w1, w2 = (w[me * L:(me + 1) * L].clone().requires_grad_() for w in (w1_all, w2_all))
    with dtp.comm_mode() as comm:
        y = dispatch_combine(x, idx_all[mine], gates, None, num_experts,
                             lambda rows, counts: GroupedExperts.run(rows, counts, w1, w2), mesh, 0, chunks)
    # the counts exchange, then each chunk's dispatch and combine; pipelining moves exactly the same bytes
    assert comm.count("all_to_all") == 1 + 2 * chunks, comm
    owner_NK = idx_all // L
    mine_N = torch.zeros(len(idx_NK), dtype=torch.bool)
    mine_N[mine] = True
    rows_out = int((owner_NK[mine_N] != me).sum())  # dispatch: my assignments to other ranks' experts
    rows_back = int((owner_NK[~mine_N] == me).sum())  # combine: other ranks' assignments to my experts
    assert comm.bytes("all_to_all") == (world - 1) * L * 8 + (rows_out + rows_back) * D * 4, comm
    seed_ND = torch.randn(len(idx_NK), D, generator=g)  # d loss / d y, the same on every layout
    (y * seed_ND[mine]).sum().backward()

    want_x, want_gates = x_all.clone().requires_grad_(), gates_all.clone().requires_grad_()
    want_w1, want_w2 = w1_all.clone().requires_grad_(), w2_all.clone().requires_grad_()
    want = _dense(want_x, idx_all, want_gates, want_w1, want_w2)
    (want * seed_ND).sum().backward()
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, want[mine], **close)
    torch.testing.assert_close(x.grad, want_x.grad[mine], **close)
    torch.testing.assert_close(gates.grad, want_gates.grad[mine], **close)
    torch.testing.assert_close(w1.grad, want_w1.grad[me * L:(me + 1) * L], **close)
    torch.testing.assert_close(w2.grad, want_w2.grad[me * L:(me + 1) * L], **close)


@st.composite
def routings(draw):
    """(world, tokens per rank, (N, K) expert indices, E, K, pipelined chunks): empty ranks, skew and repeated choices all allowed;
    each token's K experts distinct (top-k). Shrinks towards every token on experts 0..K-1."""
    world = draw(st.sampled_from([2, 4]))
    num_experts = world * draw(st.sampled_from([1, 2]))
    top_k = draw(st.integers(1, min(3, num_experts)))
    chunks = draw(st.sampled_from([1, 2, 3]))
    tokens_per_rank = draw(st.lists(st.integers(0, 4), min_size=world, max_size=world))
    token = st.permutations(list(range(num_experts))).map(lambda p: list(p[:top_k]))
    idx_NK = draw(st.lists(token, min_size=sum(tokens_per_rank), max_size=sum(tokens_per_rank)))
    return world, tokens_per_rank, idx_NK, num_experts, top_k, chunks


@settings(max_examples=8, deadline=None)
@given(routings())
def test_dispatch_equals_one_device_for_any_routing(routing):
    world, *case = routing
    run_on_ranks(world, _check_routing, *case)


def test_dispatch_with_every_token_on_one_expert_of_the_last_rank():
    # the other experts, and ep ranks 0..2 entirely, compute on zero rows; rank 1 routes no token at all
    run_on_ranks(4, _check_routing, [3, 0, 2, 1], [[7]] * 6, 8, 1, 3)


# -- the whole layer: a zero gate routes everything to experts 0 and 1 (ep rank 0 of 4) ----------------------


def _check_layer_training(steps=3):
    mesh = dtp.init_device_mesh("cpu", (4,), mesh_dim_names=("ep",))
    torch.manual_seed(0)
    single = MoE(D, F_HIDDEN, 8, top_k=2, capacity_factor=None, aux_loss_coef=0.1, z_loss_coef=0.01)
    single.router.gate.weight.data.zero_()  # all logits tie: stable top-2 takes experts 0 and 1 for every token
    net = expert_parallel(replicate(copy.deepcopy(single), mesh, "ep"), mesh, ep_mesh_dim="ep")
    net.dispatch_chunks = 2  # the all-to-alls pipelined with the experts in two chunks (one device: no effect)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False) for m in (net, single)]
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x_whole = torch.randn(5, 3, D, generator=g).requires_grad_()  # 5 rows over 4 ranks: uneven shards
        x = dtp.distribute_tensor(x_whole.detach(), mesh, [Shard(0)], src_data_rank=None).requires_grad_()
        seed = torch.randn(5, 3, D, generator=g)
        for model, inp, s, opt in ((net, x, dtp.distribute_tensor(seed, mesh, [Shard(0)], src_data_rank=None),
                                    opts[0]), (single, x_whole, seed, opts[1])):
            ((model(inp) * s).sum() + model.aux_loss).backward()
            opt.step()
            opt.zero_grad()
        # dropless: no keep mask, every one of the N K assignments processed
        assert net.routing.keep_NK is None and int(net.load.sum()) == 5 * 3 * 2
        torch.testing.assert_close(net.load, single.load)
        if step == 0:
            assert net.load.tolist() == [15, 15, 0, 0, 0, 0, 0, 0]
        torch.testing.assert_close(x.grad.full_tensor(), x_whole.grad, atol=1e-5, rtol=1e-5)
    params = dict(single.named_parameters())
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.full_tensor(), params[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_dropless_layer_trains_as_one_device_when_one_rank_gets_every_token():
    run_on_ranks(4, _check_layer_training)


# -- the pipelined backward overlaps: each chunk's gradient all-to-all is in flight while another chunk's experts run


def _check_backward_order(chunks=3):
    """The order of one pipelined backward: "i" a gradient all-to-all issued, "w" one waited for, "x" the experts'
    backward of a chunk done (a hook on the rows they received)."""
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    me = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, D, generator=g).requires_grad_()
    idx = torch.randint(0, 4, (6, 1), generator=g)
    w1, w2 = torch.randn(2, D, F_HIDDEN, generator=g), torch.randn(2, F_HIDDEN, D, generator=g)
    events = []

    def experts(rows, counts):
        rows.register_hook(lambda grad: events.append("x"))
        return GroupedExperts.run(rows, counts, w1, w2)

    issue, wait = moe_pipelined.all_to_all_splits, moe_pipelined._Issue.backward

    def recorded_issue(*args, **kwargs):
        events.append("i")
        return issue(*args, **kwargs)

    def recorded_wait(ctx, grad):
        events.append("w")
        return wait(ctx, grad)

    moe_pipelined.all_to_all_splits, moe_pipelined._Issue.backward = recorded_issue, staticmethod(recorded_wait)
    try:
        y = dispatch_combine(x, idx, torch.ones(6, 1), None, 4, experts, mesh, 0, chunks)
        events.clear()
        (y * (me + 1)).sum().backward()
    finally:
        moe_pipelined.all_to_all_splits, moe_pipelined._Issue.backward = issue, staticmethod(wait)
    return "".join(events)


def test_pipelined_backward_runs_experts_while_gradients_travel():
    orders = run_on_ranks(2, _check_backward_order)
    # every combine's gradient issued at once; then per chunk, last first: wait for its gradient rows, the experts'
    # backward, wait for the previous chunk's dispatch gradient, issue this chunk's: chunk c's experts run while
    # chunk c+1's dispatch gradient travels ("i" before an "x", its "w" after)
    assert orders == ["iii" "wxi" "wxwi" "wxwi" "w"] * 2, orders

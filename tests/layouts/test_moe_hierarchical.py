"""Topology-aware (hierarchical) dispatch, TA-MoE / Tutel's 2-D all-to-all: on a 2 x 2 mesh (nodes x ranks per
node) the tokens go inside the node first, then one aggregated message per node between nodes, and the result
equals one device for any routing (outputs, input, gate and expert gradients). The bytes on each mesh dim equal
the formula exactly: inside the node, the rows sent to and received from the node's other positions; between
nodes, exactly the rows that cross nodes in the flat dispatch; plus each hop's counts.

Legend: M nodes, G ranks per node, L experts per rank, N tokens, K top-k, D width.
"""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dtensor_plus as dtp
from dtensor_plus import Shard
from dtensor_plus.layouts.moe import GroupedExperts, MoE, expert_parallel
from dtensor_plus.layouts.moe_dispatch import dispatch_combine
from dtensor_plus.layouts.moe_hierarchical import regroup_index
from dtensor_plus.layouts.moe_placement import place_experts
from dtensor_plus.testing import run_on_ranks
from test_moe_dropless import D, F_HIDDEN, _dense  # noqa: E402  (tests/layouts is on sys.path under pytest's rootdir)

M, G = 2, 2


def _check_hierarchical(tokens_per_rank, idx_NK, num_experts, top_k):
    mesh = dtp.init_device_mesh("cpu", (M, G), mesh_dim_names=("ep_inter", "ep_intra"))
    me = torch.distributed.get_rank()
    node, position = divmod(me, G)
    L = num_experts // (M * G)
    g = torch.Generator().manual_seed(len(idx_NK))
    x_all = torch.randn(len(idx_NK), D, generator=g)
    gates_all = torch.rand(len(idx_NK), top_k, generator=g)
    w1_all, w2_all = torch.randn(num_experts, D, F_HIDDEN, generator=g), torch.randn(num_experts, F_HIDDEN, D, generator=g)
    idx_all = torch.tensor(idx_NK, dtype=torch.int64).reshape(len(idx_NK), top_k)
    source_N = torch.repeat_interleave(torch.arange(M * G), torch.tensor(tokens_per_rank))
    mine = source_N == me
    x, gates = x_all[mine].clone().requires_grad_(), gates_all[mine].clone().requires_grad_()
    w1, w2 = (w[me * L:(me + 1) * L].clone().requires_grad_() for w in (w1_all, w2_all))
    with dtp.comm_mode() as comm:
        y = dispatch_combine(x, idx_all[mine], gates, None, num_experts,
                             lambda rows, counts: GroupedExperts.run(rows, counts, w1, w2), mesh, (0, 1))
    # every assignment as (source rank, destination rank), and the bytes each hop moves by the formula
    source_A = source_N.repeat_interleave(top_k)
    dest_A = idx_all.reshape(-1) // L
    src_node, src_pos, dst_node, dst_pos = source_A // G, source_A % G, dest_A // G, dest_A % G
    # bytes sent: inside the node, my rows to other positions (dispatch) and the rows other positions sent me
    # (combine: back to them)
    intra_rows = int(((source_A == me) & (dst_pos != position)).sum()) + int(
        ((src_node == node) & (src_pos != position) & (dst_pos == position)).sum())
    # between nodes, my node's rows for (other node, my position) (dispatch), other nodes' rows for me (combine)
    inter_rows = int(((src_node == node) & (dst_node != node) & (dst_pos == position)).sum()) + int(
        ((src_node != node) & (dest_A == me)).sum())
    assert comm.bytes("all_to_all", "ep_intra") == intra_rows * D * 4 + (G - 1) * M * L * 8, comm
    assert comm.bytes("all_to_all", "ep_inter") == inter_rows * D * 4 + (M - 1) * G * L * 8, comm
    # two calls per hop: the counts, the rows out; then the rows back
    assert comm.count("all_to_all", "ep_intra") == 3 and comm.count("all_to_all", "ep_inter") == 3, comm
    seed_ND = torch.randn(len(idx_NK), D, generator=g)
    (y * seed_ND[mine]).sum().backward()

    want_x, want_gates = x_all.clone().requires_grad_(), gates_all.clone().requires_grad_()
    want_w1, want_w2 = w1_all.clone().requires_grad_(), w2_all.clone().requires_grad_()
    (_dense(want_x, idx_all, want_gates, want_w1, want_w2) * seed_ND).sum().backward()
    want = _dense(x_all, idx_all, gates_all, w1_all, w2_all)
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, want[mine], **close)
    torch.testing.assert_close(x.grad, want_x.grad[mine], **close)
    torch.testing.assert_close(gates.grad, want_gates.grad[mine], **close)
    torch.testing.assert_close(w1.grad, want_w1.grad[me * L:(me + 1) * L], **close)
    torch.testing.assert_close(w2.grad, want_w2.grad[me * L:(me + 1) * L], **close)


@st.composite
def routings(draw):
    """(tokens per rank, (N, K) expert indices, E, K) on 2 x 2 ranks: empty ranks, skew, every row on one node."""
    num_experts = M * G * draw(st.sampled_from([1, 2]))
    top_k = draw(st.integers(1, 2))
    tokens_per_rank = draw(st.lists(st.integers(0, 4), min_size=M * G, max_size=M * G))
    token = st.permutations(list(range(num_experts))).map(lambda p: list(p[:top_k]))
    idx_NK = draw(st.lists(token, min_size=sum(tokens_per_rank), max_size=sum(tokens_per_rank)))
    return tokens_per_rank, idx_NK, num_experts, top_k


@settings(max_examples=3, deadline=None)
@given(routings())
def test_hierarchical_dispatch_equals_one_device_with_bytes_per_link_level(routing):
    run_on_ranks(4, _check_hierarchical, *routing)


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(routings())
def test_hierarchical_dispatch_over_many_routings(routing):
    run_on_ranks(4, _check_hierarchical, *routing)


def test_regroup_index_reorders_groups_and_keeps_rows_in_order():
    counts = torch.tensor([[[2, 0], [1, 1]], [[0, 3], [1, 0]]])  # (M, G, L): rows [0 1] [] [2] [3] [] [4 5 6] [7] []
    rows = torch.arange(8)
    # by (G, M, L): (g0 m0) [0 1] [], (g0 m1) [] [4 5 6], (g1 m0) [2] [3], (g1 m1) [7] []
    new = rows[regroup_index(counts, (1, 0, 2), 8)]
    assert new.tolist() == [0, 1, 4, 5, 6, 2, 3, 7]


# -- the whole layer on a (nodes, ranks per node) mesh: three AdamW steps equal one device, the middle one --
# -- data-parallel over experts (moe_switch.py); what it does not do raises ------------------------------------


def _check_layer_training(steps=3):
    mesh = dtp.init_device_mesh("cpu", (M, G), mesh_dim_names=("ep_inter", "ep_intra"))
    torch.manual_seed(0)
    single = MoE(D, F_HIDDEN, 8, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01)
    net = expert_parallel(dtp.distribute_module(copy.deepcopy(single), mesh), mesh,
                          ep_mesh_dim=("ep_inter", "ep_intra"))
    assert net.experts.w1.placements == (Shard(0), Shard(0))
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False) for m in (net, single)]
    for step in range(steps):
        net.expert_mode = ("ep", "dp", "ep")[step]  # Tutel's switch on two ep mesh dims: the weights gathered on both
        g = torch.Generator().manual_seed(step)
        x_whole = torch.randn(5, 3, D, generator=g).requires_grad_()  # 5 rows over 2 x 2 ranks: uneven, one of 1
        x = dtp.distribute_tensor(x_whole.detach(), mesh, [Shard(0), Shard(0)], src_data_rank=None).requires_grad_()
        seed = torch.randn(5, 3, D, generator=g)
        with dtp.comm_mode() as comm:
            y = net(x)
        hops = 3 if net.mode == "ep" else 0
        assert comm.count("all_to_all", "ep_inter") == hops and comm.count("all_to_all", "ep_intra") == hops, comm
        for model, out, s, opt in ((net, y, dtp.distribute_tensor(seed, mesh, [Shard(0), Shard(0)], src_data_rank=None),
                                    opts[0]), (single, single(x_whole), seed, opts[1])):
            ((out * s).sum() + model.aux_loss).backward()
            opt.step()
            opt.zero_grad()
        torch.testing.assert_close(net.load, single.load)
        torch.testing.assert_close(x.grad.full_tensor(), x_whole.grad, atol=1e-5, rtol=1e-5)
    params = dict(single.named_parameters())
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.full_tensor(), params[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    _check_errors(net, mesh, x)


def _check_errors(net, mesh, x):
    """What the hierarchical layout does not do says so, naming the fix."""
    with pytest.raises(ValueError, match="must be in mesh order"):
        expert_parallel(MoE(D, F_HIDDEN, 8), mesh, ep_mesh_dim=("ep_intra", "ep_inter"))
    with pytest.raises(ValueError, match="must name distinct mesh dims"):
        expert_parallel(MoE(D, F_HIDDEN, 8), mesh, ep_mesh_dim=("ep_inter", "ep_intra"), tp_mesh_dim="ep_intra")
    for attribute, value, match in (("dispatch_chunks", 2, "use chunks=1"), ("shadowed", (0,), "shadow experts run on one"),
                                    ("expert_mode", "both", "expert_mode must be one of")):
        old, _ = getattr(net, attribute), setattr(net, attribute, value)
        with pytest.raises(ValueError, match=match):
            net(x)
        setattr(net, attribute, old)
    with pytest.raises(ValueError, match="re-placing experts needs them on one ep mesh dim"):
        place_experts(net, torch.arange(8))


def test_hierarchical_layer_trains_as_one_device():
    run_on_ranks(4, _check_layer_training)

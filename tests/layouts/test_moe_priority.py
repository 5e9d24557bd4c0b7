"""Lina (``moe_priority.AllToAllFirst``): a gradient bucket's all-reduce handed over during the MoE's backward goes
in pieces, one per gap between the MoE's backward all-to-alls, the rest when its result is waited for; the
all-to-alls are never queued behind more than one gap's pieces. The reduced buffer is the sum over ranks, the
layer's gradients equal one device, and the issue order is the same on every rank. Under ``replicate(...,
all_reduce_launcher=scheduler)`` the buckets' all-reduces go through it and training equals one device.

Legend: D width, F expert hidden width.
"""

import copy

import pytest
import torch
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import Shard
from dtensor_plus.layouts import moe_pipelined, moe_priority
from dtensor_plus.layouts.data import replicate
from dtensor_plus.layouts.moe import MoE, expert_parallel
from dtensor_plus.layouts.moe_priority import AllToAllFirst
from dtensor_plus.testing import run_on_ranks
from test_moe import D as D_NET  # noqa: E402  (tests/layouts is on sys.path under pytest's rootdir)
from test_moe import _data, _net  # noqa: E402
from test_moe_dropless import D, F_HIDDEN  # noqa: E402

EP = 4


# the issue order of one backward with a 5-piece bucket handed over as it starts: "p" a piece, "a" an all-to-all;
# then the pieces still queued, issued by wait()
EXPECTED = {
    1: ("papap", "pp"),  # the combine's gradient all-to-all, its arrival's piece; the dispatch's, likewise
    2: ("paapappap", ""),  # both combines issued at once; a piece after each of the 4 arrivals
}


def _check_all_to_all_first(chunks):
    mesh = dtp.init_device_mesh("cpu", (EP,), mesh_dim_names=("ep",))
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    single = MoE(D, F_HIDDEN, 8, top_k=2, dispatch_chunks=chunks)
    net = expert_parallel(replicate(copy.deepcopy(single), mesh, "ep"), mesh, ep_mesh_dim="ep")
    scheduler = AllToAllFirst(piece_bytes=8, pieces_per_gap=1)  # 2 float32 per piece: a 10-element bucket, 5 pieces
    net.comm_priority = scheduler
    events, handle = [], []
    issue, all_to_all_splits = moe_priority._Piece.issue, moe_pipelined.all_to_all_splits

    def recorded_issue(piece):
        events.append("p")
        issue(piece)

    def recorded_all_to_all(*args, **kwargs):
        events.append("a")
        return all_to_all_splits(*args, **kwargs)

    moe_priority._Piece.issue, moe_pipelined.all_to_all_splits = recorded_issue, recorded_all_to_all
    try:
        g = torch.Generator().manual_seed(1)
        x_whole = torch.randn(6, 3, D, generator=g).requires_grad_()
        x = dtp.distribute_tensor(x_whole.detach(), mesh, [Shard(0)], src_data_rank=None).requires_grad_()
        y = net(x).to_local()
        bucket = torch.arange(10.0) * (rank + 1)
        # a bucket a later layer's gradients filled, handed over as the MoE's backward starts
        y.register_hook(lambda grad: handle.append(scheduler(bucket, mesh, 0)))
        events.clear()
        y.sum().backward()  # d sum / d y = 1 everywhere, as for one device's sum below
        in_backward = "".join(events)
        reduced = handle[0].wait()
        at_wait = "".join(events)[len(in_backward):]
    finally:
        moe_priority._Piece.issue, moe_pipelined.all_to_all_splits = issue, all_to_all_splits
    assert (in_backward, at_wait) == EXPECTED[chunks]
    assert scheduler.queued == 0
    torch.testing.assert_close(reduced, torch.arange(10.0) * sum(range(1, EP + 1)))
    single(x_whole).sum().backward()
    torch.testing.assert_close(x.grad.full_tensor(), x_whole.grad, atol=1e-5, rtol=1e-5)
    grads = dict(single.named_parameters())
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), grads[name].grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunks", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_all_reduce_pieces_go_in_the_gaps_between_all_to_alls(chunks):
    run_on_ranks(EP, _check_all_to_all_first, chunks)  # on every rank: the same collectives in the same order


def test_bad_sizes_name_the_fix():
    with pytest.raises(ValueError, match="piece_bytes and pieces_per_gap must be >= 1"):
        AllToAllFirst(piece_bytes=0)


# -- with replicate's buckets: Linear -> MoE -> Linear trained under dp = ep, the buckets' all-reduces in pieces ---


def _check_training_with_buckets(whole, steps=3):
    mesh = dtp.init_device_mesh("cpu", (EP,), mesh_dim_names=("dp",))
    single = _net(8, 2)
    scheduler = AllToAllFirst(piece_bytes=64, pieces_per_gap=2)
    handed = []

    def launcher(buffer, mesh, mesh_dim):
        handed.append(buffer.numel())
        return scheduler(buffer, mesh, mesh_dim)

    net = copy.deepcopy(single)
    if whole:  # the model replicated whole: a module holding a MoE runs on the DTensor path, and so do its buckets
        replicate(net, mesh, "dp", all_reduce_launcher=launcher)
        expert_parallel(net.moe, mesh, ep_mesh_dim="dp")
    else:  # the dense Linears replicated on their own (local compute's flat buckets), the MoE apart
        for dense in (net.inp, net.out):
            replicate(dense, mesh, "dp", all_reduce_launcher=launcher)
        expert_parallel(replicate(net.moe, mesh, "dp"), mesh, ep_mesh_dim="dp")
    # the gradients summed through the launcher: every parameter Replicate on dp (the experts are sharded there)
    # when the model is replicated whole; the dense Linears' alone when they are replicated apart
    handed_over = net if whole else nn.ModuleList([net.inp, net.out])
    summed = sum(p.numel() for p in handed_over.parameters() if p.placements[0].is_replicate())
    net.moe.comm_priority = scheduler
    net.moe.dispatch_chunks = 2
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False) for m in (net, single)]
    for step in range(steps):
        x, y = _data(7, step)  # 7 rows over 4 ranks: uneven shards
        shard = lambda t: dtp.distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)  # noqa: E731
        for model, (inp, target), opt in ((net, (shard(x), shard(y)), opts[0]), (single, (x, y), opts[1])):
            model.loss(inp, target).backward()
            opt.step()
            opt.zero_grad()
        assert scheduler.queued == 0
    # the Linears' gradients (and, replicated whole, the router's) went through the scheduler every step
    assert sum(handed) == steps * summed >= steps * 2 * (D_NET * D_NET + D_NET), handed
    params = dict(single.named_parameters())
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.full_tensor(), params[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("whole", [False, True], ids=["dense-apart", "whole"])
def test_training_with_replicates_buckets_through_the_scheduler_equals_one_device(whole):
    run_on_ranks(EP, _check_training_with_buckets, whole)

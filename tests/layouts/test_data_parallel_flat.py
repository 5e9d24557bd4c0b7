"""replicate's flat buckets (layouts/data_flat.py): the local leaves' .grad are views of one flat buffer per bucket,
gradients accumulate in place, and .grad comes back as a DTensor over the reduced buffer made once. One device's
semantics are the bar, step by step, on an uneven batch (5 rows: 3 and 2) with a tied weight and an unused
parameter (and without it: the last bucket unhooked): gradients (input's too) and parameters after AdamW, with
zero_grad(set_to_none=True) and False, two backwards before a step, a .grad modified or set by hand, a .grad held
across the next step, a second backward with no forward (retain_graph), a torch.autograd.grad of the input alone
(nothing reduced); and one all-reduce per bucket, each started as its last gradient lands.

Legend: B batch, T sequence, D model width.
"""

import copy
import weakref

import torch
from torch import nn

import dtensor_plus as dtp
from dtensor_plus import DTensor, Replicate, collectives
from dtensor_plus.layouts.data import replicate, shard_batch
from dtensor_plus.testing import run_on_ranks
from test_data_parallel_overlap import _bucket  # noqa: E402  (replicate's GradientBucket of a model)

T, D = 3, 8


class Tied(nn.Module):
    """``fc_in`` and ``fc_out`` hold one weight; ``unused`` never computes (its .grad stays None)."""

    def __init__(self, with_unused=True):
        super().__init__()
        self.fc_in = nn.Linear(D, D)
        self.fc_out = nn.Linear(D, D, bias=False)
        self.fc_out.weight = self.fc_in.weight
        if with_unused:
            self.unused = nn.Linear(D, 2)

    def forward(self, x_BTD):
        return self.fc_out(torch.tanh(self.fc_in(x_BTD)))


def _check(model, reference, what):
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is None:
            assert p.grad is None, f"{what}: {name} has a gradient, one device's has none"
            continue
        assert isinstance(p.grad, DTensor) and p.grad.placements == (Replicate(),), (what, name)
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=lambda m: f"{what}: grad of {name}: {m}")


def _flat_buckets_equal_one_device(cap_mb, with_launcher, with_unused=True):
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    reference = Tied(with_unused)
    launched = []

    def launcher(buffer, mesh, mesh_dim):  # Lina's hook: who starts each bucket's all-reduce
        launched.append(buffer.numel())
        return collectives.all_reduce(buffer, mesh, mesh_dim, "sum", async_op=True)

    model = replicate(copy.deepcopy(reference), mesh, bucket_cap_mb=cap_mb,
                      all_reduce_launcher=launcher if with_launcher else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    g = torch.Generator().manual_seed(1)

    def backward(rows, scale=1.0, **kwargs):
        x = torch.randn(rows, T, D, generator=g)
        x_dt = shard_batch(x, mesh).requires_grad_()
        x_ref = x.clone().requires_grad_()
        (model(x_dt).pow(2).mean() * scale).backward(**kwargs)
        (reference(x_ref).pow(2).mean() * scale).backward(**kwargs)
        torch.testing.assert_close(x_dt.grad.full_tensor(), x_ref.grad)

    def step(what, set_to_none=True):
        _check(model, reference, what)
        opt.step()
        ref_opt.step()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.full_tensor(), q.detach(), msg=lambda m: f"{what}: {name} after step: {m}")
        opt.zero_grad(set_to_none=set_to_none)
        ref_opt.zero_grad(set_to_none=set_to_none)

    bucket = _bucket(model)
    with dtp.comm_mode() as counter:
        backward(5)
    flat = bucket.flat
    assert counter.count("all_reduce", "dp") == len(flat.buckets), (counter.report(), len(flat.buckets))
    if with_launcher:
        assert launched == [b.flat.numel() for b in flat.buckets], launched
    step("first backward")

    backward(5)  # the layout rebuilt in the landing order; .grad are the new buckets' DTensors from now on
    # Every gradient landed in the first backward (no unused parameter): its last bucket has no hooks now
    unhooked = [not b.hooked and not any(leaf._post_accumulate_grad_hooks for leaf in b.leaves) for b in flat.buckets]
    assert unhooked == [False] * (len(unhooked) - 1) + [not with_unused], unhooked
    step("second backward")
    backward(3)
    assert all(p.grad is None or any(p.grad is w for b in flat.buckets for w in b.wrappers)
               for p in model.parameters()), "a .grad is not its bucket's DTensor"
    grads = [None if p.grad is None else weakref.ref(p.grad) for p in model.parameters()]  # not held: weak
    step("third backward")
    backward(5)
    assert all((r is None and p.grad is None) or r() is p.grad for r, p in zip(grads, model.parameters())), \
        "a .grad was made anew"

    held = model.fc_in.bias.grad  # kept across zero_grad(set_to_none=True) and the next backward: must not change
    held_local, held_values = held.to_local(), held.full_tensor().clone()
    step("fourth backward")
    backward(5)
    torch.testing.assert_close(held.full_tensor(), held_values)
    torch.testing.assert_close(held_local, held_values)
    step("with a .grad held from the step before", set_to_none=False)

    backward(5)  # onto zeroed .grad (set_to_none=False): accumulated, not overwritten
    step("after zero_grad(set_to_none=False)")
    backward(5)
    backward(3, scale=0.5)  # two backwards, one step
    for p, q in zip(model.parameters(), reference.parameters()):
        if q.grad is not None:
            p.grad.mul_(0.5)  # modified in place by the user (as clip_grad_norm_ does)
            q.grad.mul_(0.5)
    step("two backwards, .grad halved by hand")

    by_hand = torch.randn(D, generator=g)
    model.fc_in.bias.grad = dtp.distribute_tensor(by_hand, mesh, [Replicate()], src_data_rank=None)
    reference.fc_in.bias.grad = by_hand.clone()
    backward(5)  # added to the .grad set by hand
    step("onto a .grad set by hand")
    x_again = torch.randn(4, T, D, generator=g)
    out, ref_out = model(shard_batch(x_again, mesh)), reference(x_again)
    out.sum().backward(retain_graph=True)
    ref_out.sum().backward(retain_graph=True)
    out.pow(2).sum().backward()  # a second backward of the same graph: no forward armed it
    ref_out.pow(2).sum().backward()
    step("a second backward with no forward")
    x_dt = shard_batch(x_again, mesh).requires_grad_()
    with dtp.comm_mode() as counter:  # no parameter's gradient lands: nothing reduced, nothing on .grad
        (grad_x,) = torch.autograd.grad(model(x_dt).pow(2).mean(), x_dt)
    x_ref = x_again.clone().requires_grad_()
    torch.testing.assert_close(grad_x.full_tensor(), torch.autograd.grad(reference(x_ref).pow(2).mean(), x_ref)[0])
    assert counter.count("all_reduce") == 0 and all(p.grad is None for p in model.parameters()), counter.report()
    backward(5)
    step("after a torch.autograd.grad of the input alone")
    return True


def test_flat_buckets_equal_one_device():
    """One bucket for the whole model (the default caps), then one per gradient (4-byte caps: every gradient
    starts its own all-reduce, in layout order, through a launcher given to replicate); then without the unused
    parameter, so the layout is rebuilt in the landing order and its last bucket's leaves go unhooked (their
    gradients found on the leaves as backward ends)."""
    for cap_mb, with_launcher, with_unused in ((25, False, True), (4 / 2**20, True, True), (25, False, False)):
        assert all(run_on_ranks(2, _flat_buckets_equal_one_device, cap_mb, with_launcher, with_unused))


def _sparse_embedding_gradients_equal_one_device():
    """An nn.Embedding(sparse=True): its sparse gradient lands in the dense flat bucket (hooked in the first
    backward, unhooked after), reduced; three SGD steps equal one device."""
    mesh = dtp.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Embedding(11, D, sparse=True), nn.Linear(D, D))
    model = replicate(copy.deepcopy(reference), mesh)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference))
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        tokens = torch.randint(0, 11, (5, T), generator=g)
        model(shard_batch(tokens, mesh)).pow(2).mean().backward()
        reference(tokens).pow(2).mean().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad.to_dense(), msg=lambda m: f"{step} {name}: {m}")
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach())
    return True


def test_sparse_embedding_gradients_equal_one_device():
    assert all(run_on_ranks(2, _sparse_embedding_gradients_equal_one_device))

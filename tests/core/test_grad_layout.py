"""Leaf gradients come back in the leaf's layout (dtensor_plus/grad_layout.py), with single-device values."""

import copy

import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from dtensor_plus import Partial, Replicate, Shard, comm_mode, distribute_tensor, init_device_mesh
from dtensor_plus.grad_layout import leaf_grad_placements
from dtensor_plus.placements import StridedShard
from dtensor_plus.testing import run_on_ranks

# Backward formulas whose natural gradient layout is not the input's: an expand of a replicated scalar (sum),
# a slice of a replicated zeros (indexing), a Partial product (mm over a sharded contraction dim).
FUNCTIONS = {
    "sum": lambda t: t.sum(),
    "mean0": lambda t: t.mean(0).sum(),
    "slice": lambda t: t[1:3].pow(2).sum(),
    "softmax": lambda t: t.softmax(-1).pow(2).sum(),
    "mm": lambda t: (t @ t.T).sum(),
    "exp": lambda t: t.exp().sum(),
}


def _check(name, placements, use_autograd_grad):
    mesh = init_device_mesh("cpu", (2, 2))
    whole = torch.arange(20.0).reshape(4, 5) / 10
    x = distribute_tensor(whole, mesh, placements).requires_grad_()
    if use_autograd_grad:
        (grad,) = torch.autograd.grad(FUNCTIONS[name](x), x)
    else:
        FUNCTIONS[name](x).backward()
        grad = x.grad
    ref = whole.clone().requires_grad_()
    FUNCTIONS[name](ref).backward()
    torch.testing.assert_close(grad.full_tensor(), ref.grad)
    return grad.placements


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(sorted(FUNCTIONS)),
       placements=st.tuples(*[st.sampled_from([Shard(0), Shard(1), Replicate()])] * 2),
       use_autograd_grad=st.booleans())
def test_leaf_gradient_takes_the_leaf_layout(name, placements, use_autograd_grad):
    got = run_on_ranks(4, _check, name, list(placements), use_autograd_grad)[0]
    assert got == placements


def _parameters_keep_the_hook():
    """nn.Parameter(dtensor), its deepcopy, a detach().requires_grad_() and `requires_grad = True` keep the layout; a Partial
    gradient of a Replicate leaf stays Partial (data parallelism and ZeRO reduce it in buckets)."""
    mesh = init_device_mesh("cpu", (2,))
    p = nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(1)]))
    attribute = p.detach()
    attribute.requires_grad = True
    for leaf in (p, copy.deepcopy(p), p.detach().requires_grad_(), attribute):
        leaf.sum().backward()
        assert leaf.grad.placements == (Shard(1),), leaf.grad.placements
    x2 = distribute_tensor(torch.arange(8.0).reshape(4, 2), mesh, [Shard(0)]).requires_grad_()
    (g,) = torch.autograd.grad(x2.pow(3).sum(), x2, create_graph=True)  # the move stays differentiable
    assert g.placements == (Shard(0),)
    g.sum().backward()
    torch.testing.assert_close(x2.grad.full_tensor(), 6 * torch.arange(8.0).reshape(4, 2))
    w = distribute_tensor(torch.ones(4, 3), mesh, [Replicate()]).requires_grad_()
    x = distribute_tensor(torch.ones(6, 4), mesh, [Shard(0)])  # the batch split: w's gradient is a Partial sum
    with comm_mode() as comm:
        (x @ w).sum().backward()
    assert w.grad.placements == (Partial(),) and comm.count() == 0
    torch.testing.assert_close(w.grad.full_tensor(), torch.full((4, 3), 6.0))


def test_parameters_keep_the_hook():
    run_on_ranks(2, _parameters_keep_the_hook)


def test_the_table():
    zigzag = StridedShard(1, 1, zigzag=True)
    assert leaf_grad_placements((Shard(0), Replicate(), Partial(), zigzag), (Replicate(), Partial(), Partial(), Replicate())) \
        == (Shard(0), Partial(), Replicate(), zigzag)

"""The B/W split's own machinery, beside a plain backward: W adding plain parameters' gradients itself (and leaving
hooked ones to the engine), a captured gradient that aliases the input gradient, and the recorded walk refusing a
graph with an edge it did not have.

Legend: B batch, D width.
"""

import copy

import torch
from torch import nn

from dtensor_plus.layouts.pipeline.backward import backward_input, backward_weight

B, D = 5, 7  # sizes no layer shares


class Branches(nn.Module):
    """LayerNorm, three parallel Linears (attention's q, k, v) combined, a Linear in series: the split defers the
    four weight matmuls and captures the six LayerNorm and bias gradients."""

    def __init__(self, d):
        super().__init__()
        self.ln, self.q, self.k, self.v, self.out = (nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, d),
                                                     nn.Linear(d, d), nn.Linear(d, d))

    def forward(self, x_BD):
        h_BD = self.ln(x_BD)
        return self.out(torch.tanh(self.q(h_BD)) * self.k(h_BD) + self.v(h_BD))


def _hooked(block, calls):
    """A post-accumulate hook on q.weight (data parallelism's kind) and a tensor hook doubling k.bias's gradient:
    W must leave both leaves to the engine, which runs them."""
    block.q.weight.register_post_accumulate_grad_hook(lambda p: calls.append("q.weight"))
    block.k.bias.register_hook(lambda g: g * 2)
    return block


def test_w_adds_plain_gradients_itself_and_leaves_hooked_ones_to_the_engine():
    """Three microbatches (the first takes ``.grad``, the next add to it): every gradient equals the plain
    backward's bit for bit, the hooks fire once per microbatch on both sides, and B alone touches no ``.grad``."""
    torch.manual_seed(0)
    calls, ref_calls = [], []
    block = _hooked(Branches(D), calls)
    ref = _hooked(copy.deepcopy(Branches(D)), ref_calls)
    ref.load_state_dict(block.state_dict())
    plans = {}
    for i in range(3):
        x, g = torch.randn(B, D), torch.randn(B, D)
        leaf = x.clone().requires_grad_()
        grads_before = [None if p.grad is None else p.grad.clone() for p in block.parameters()]
        grad_x, state = backward_input(block(leaf), g, leaf, list(block.parameters()), plans)
        for before, p in zip(grads_before, block.parameters()):
            assert (p.grad is None) if before is None else torch.equal(p.grad, before), i
        backward_weight(state)
        leaf_ref = x.clone().requires_grad_()
        ref(leaf_ref).backward(g)
        assert torch.equal(grad_x, leaf_ref.grad), i
        for (name, p), q in zip(block.named_parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad), (i, name)
        assert calls == ref_calls == ["q.weight"] * (i + 1)


class AddParameter(nn.Module):
    """``x + p`` with p of x's shape: the gradient captured for p is the very tensor that flows on to the input."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(B, D))

    def forward(self, x_BD):
        return x_BD + self.p


def test_w_copies_a_captured_gradient_it_does_not_own():
    """The first ``.grad`` W sets from a captured gradient is a copy: the input gradient B returned (sent to the
    previous stage, a buffer the executor may reuse) and the next microbatch's addition stay apart."""
    module = AddParameter()
    for i in range(2):
        g = torch.randn(B, D)
        leaf = torch.randn(B, D, requires_grad=True)
        grad_x, state = backward_input(module(leaf), g, leaf, list(module.parameters()))
        backward_weight(state)
        if i == 0:
            first = g.clone()
            assert module.p.grad.data_ptr() not in (grad_x.data_ptr(), g.data_ptr())
            grad_x.zero_()  # what a reused buffer would do
        else:
            assert torch.equal(module.p.grad, first + g)


def test_the_recorded_walk_refuses_a_graph_with_an_edge_it_did_not_have():
    """A bias frozen on the first microbatch (its addmm slot empty) and trained on the second: the replayed walk
    sees the new edge, walks anew, and the bias gets its gradient."""
    torch.manual_seed(0)
    block = Branches(D)
    ref = copy.deepcopy(block)
    plans = {}
    for i, trained in enumerate((False, True)):
        for b in (block.out.bias, ref.out.bias):
            b.requires_grad_(trained)
        x, g = torch.randn(B, D), torch.randn(B, D)
        leaf = x.clone().requires_grad_()
        grad_x, state = backward_input(block(leaf), g, leaf, list(block.parameters()), plans)
        walk = plans["walk"]
        backward_weight(state)
        leaf_ref = x.clone().requires_grad_()
        ref(leaf_ref).backward(g)
        assert torch.equal(grad_x, leaf_ref.grad), i
        for (name, p), q in zip(block.named_parameters(), ref.parameters()):
            assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), (i, name)
        if i == 0:
            first_walk = walk
    assert walk is not first_walk
    assert block.out.bias.grad is not None


class TiedScale(nn.Module):
    """A Linear whose weight also multiplies the input directly (a weight used twice: once through ``t()``, a
    deferrable matmul, once straight into its AccumulateGrad, a captured edge), its tensor hook doubling the
    gradient: the hook must see the sum of both uses once, as in a plain backward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x_BD):
        return self.fc(x_BD) + x_BD @ self.fc.weight


def test_a_hooked_weight_used_twice_is_hooked_once_on_its_whole_gradient():
    torch.manual_seed(0)
    block, ref = TiedScale(), TiedScale()
    ref.load_state_dict(block.state_dict())
    for m in (block, ref):
        m.fc.weight.register_hook(lambda g: g * 2)
    x, g = torch.randn(B, D), torch.randn(B, D)
    leaf = x.clone().requires_grad_()
    grad_x, state = backward_input(block(leaf), g, leaf, list(block.parameters()))
    backward_weight(state)
    leaf_ref = x.clone().requires_grad_()
    ref(leaf_ref).backward(g)
    assert torch.equal(grad_x, leaf_ref.grad)
    for (name, p), q in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-6, msg=name)
